"""Local launcher: the embedded Redis and every service as supervised processes on loopback.

`tokenmill up` starts a detached supervisor (`python -m tokenmill.common.platform.launcher supervise`) and waits
until every service answers SERVING on grpc.health.v1. The supervisor owns the children: it
restarts a crashed one with exponential backoff, writes logs and pids under
`<data_dir>/logs` and `<data_dir>/run`, and on SIGTERM stops them all (SIGTERM, grace, SIGKILL).
The embedded Redis is supervised the same way (`RedisWatch`): a failed restart is logged, backed off,
retried and shown by `tokenmill status`, never fatal, since the services ride out a Redis outage.
Other commands add processes (e.g. `tokenmill serve` adds inference replicas) by editing the
process table `<data_dir>/run/processes.json`; the supervisor notices the change and converges.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import psutil

from tokenmill.common.clients.base import BaseClient, client_tls
from tokenmill.common.config import SERVICE_NAMES, Config, load_config
from tokenmill.common.errors import TokenmillError
from tokenmill.common.procs import pid_alive as _alive

if TYPE_CHECKING:
    from tokenmill.common.platform.redis_embedded import EmbeddedRedis

log = logging.getLogger("tokenmill.launcher")

MAX_BACKOFF_SECONDS = 30.0
HEALTHY_RESET_SECONDS = 60.0  # a child that ran this long restarts without backoff
STOP_GRACE_SECONDS = 25.0
# One Redis restart waits this long for its port; then the supervisor backs off and tries again,
# so a port that stays taken never stalls the restarts of the other children for long.
REDIS_PORT_WAIT_SECONDS = 10.0
REDIS_ROW = "redis"  # its name in state.json and `tokenmill status`


@dataclass
class ProcessSpec:
    """One supervised child: a name, an argv and extra environment."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_address: str = ""  # host:port answering grpc.health.v1, if any


@dataclass
class ChildState:
    pid: int  # 0 while not running
    started_at: float
    restarts: int = 0
    last_exit: int | None = None
    error: str = ""  # why the last (re)start failed, for `tokenmill status`


def _backoff(failures: int) -> float:
    return min(MAX_BACKOFF_SECONDS, 2.0 ** min(failures, 5))


class RunDir:
    """The files under `<data_dir>/run` that the supervisor and the CLI share."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.path = data_dir / "run"
        self.logs = data_dir / "logs"
        self.processes = self.path / "processes.json"
        self.state = self.path / "state.json"
        self.supervisor_pid = self.path / "supervisor.pid"

    def ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)

    def read_processes(self) -> list[ProcessSpec]:
        if not self.processes.exists():
            return []
        return [ProcessSpec(**p) for p in json.loads(self.processes.read_text())]

    def write_processes(self, specs: Iterable[ProcessSpec]) -> None:
        _write_json_atomic(self.processes, [asdict(s) for s in specs])

    def read_state(self) -> dict[str, ChildState]:
        try:
            raw = json.loads(self.state.read_text())
        except (OSError, ValueError):
            return {}
        return {name: ChildState(**s) for name, s in raw.items()}

    def supervisor_running(self) -> int | None:
        """The supervisor's pid if it is alive."""
        try:
            pid = int(self.supervisor_pid.read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def orphans(self) -> dict[str, int]:
        """Children a dead supervisor (e.g. kill -9) left running, name -> pid: in the table and in
        its last state, alive, with exactly their spec's command line (not a reused pid). They run in
        their own sessions, so they outlive it; the next supervisor adopts them (`Supervisor.adopt`).
        Meaningful only while no supervisor runs."""
        specs = {s.name: s for s in self.read_processes()}
        found = {}
        for name, child in self.read_state().items():
            spec = specs.get(name)
            if spec is not None and _alive(child.pid) and _cmdline(child.pid) == spec.argv:
                found[name] = child.pid
        return found


def _cmdline(pid: int) -> list[str]:
    try:
        return list(psutil.Process(pid).cmdline())
    except psutil.Error:
        return []


class AdoptedChild:
    """A child a previous supervisor started and left running: watched by pid (only its parent could
    wait for it), stopped like any other. Its exit code is unknown (-1)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not _alive(self.pid):
            self.returncode = -1
        return self.returncode

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
            time.sleep(0.05)
        return code


def _write_json_atomic(path: Path, payload: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def ensure_auth_token(data_dir: Path) -> None:
    """Create the platform's own bearer token `<data_dir>/auth_token` (0600) if it is missing.

    Runs before the full config is validated: with auth on and no tokens configured, that
    validation needs this file to exist.
    """
    token_file = data_dir / "auth_token"
    if token_file.exists():
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")


def service_specs(config: Config, config_path: str | None) -> list[ProcessSpec]:
    """The five platform services, each `python -m tokenmill.services.<name>`."""
    specs = []
    for name in SERVICE_NAMES:
        argv = [sys.executable, "-m", f"tokenmill.services.{name}"]
        if config_path:
            argv += ["--config", config_path]
        specs.append(ProcessSpec(name=name, argv=argv, health_address=config.service(name).address))
    return specs


def health_status(config: Config, address: str, timeout: float = 1.0) -> str:
    """grpc.health.v1 Check (health is open without a token); the status name, or why not."""
    with BaseClient(address, tls=client_tls(config), retry=False) as client:
        try:
            return client.health(timeout=timeout)
        except TokenmillError as exc:
            return f"UNREACHABLE ({exc.code})"


class RedisWatch:
    """The embedded Redis as a supervised child: restarted when it dies, a failed start logged,
    recorded and retried with backoff. The port (hence the URL the children hold) never changes."""

    def __init__(self, server: EmbeddedRedis):
        self.server = server
        self.url: str | None = None  # known after the first successful start
        self.state = ChildState(pid=0, started_at=0.0)
        self.failures = 0
        self.next_start = 0.0

    def check(self, now: float) -> None:
        """Start the server if it is not running and its backoff has passed; never raises for a
        failed start (the supervisor must keep the other children up)."""
        if now < self.next_start or (self.url is not None and self.server.alive()):
            return
        if self.url is not None:
            log.warning("supervisor: embedded redis died; restarting it")
            self.state.restarts += 1
        try:
            self.url = self.server.start()
        except (RuntimeError, OSError) as exc:
            self.failures += 1
            self.next_start = now + _backoff(self.failures)
            self.state.pid, self.state.error = 0, str(exc)
            log.error(
                "supervisor: embedded redis did not start (retry in %.0fs): %s", self.next_start - now, exc
            )
            return
        rec = self.server.recorded()
        self.failures, self.next_start = 0, 0.0
        self.state = ChildState(rec[1] if rec else 0, time.time(), self.state.restarts)


class Supervisor:
    """Keeps the process table converged: start what is missing, restart what died, stop what was removed."""

    def __init__(self, config: Config, run_dir: RunDir):
        self.config = config
        self.run_dir = run_dir
        self.children: dict[str, subprocess.Popen[bytes] | AdoptedChild] = {}
        self.running: dict[str, ProcessSpec] = {}  # the spec each child was started from
        self.state: dict[str, ChildState] = {}
        self.next_start: dict[str, float] = {}
        self.stopping = False
        self.redis: RedisWatch | None = None

    def run(self) -> None:
        self.run_dir.ensure()
        self.adopt(self.run_dir.orphans())
        self.run_dir.supervisor_pid.write_text(str(os.getpid()))
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        env = self._base_env()
        try:
            while not self.stopping:
                try:
                    self._converge(env)
                except Exception:  # one failed step must not take every child down with it
                    log.exception("supervisor: converge failed; retrying")
                time.sleep(0.3)
        finally:
            self._stop_all()
            if self.redis is not None:
                self.redis.server.stop()
            self.run_dir.state.unlink(missing_ok=True)
            self.run_dir.supervisor_pid.unlink(missing_ok=True)

    def adopt(self, orphans: dict[str, int]) -> None:
        """Take over the children a killed supervisor left running (RunDir.orphans) instead of
        starting second copies that cannot bind their ports: what they serve never stops."""
        state = self.run_dir.read_state()
        specs = {s.name: s for s in self.run_dir.read_processes()}
        for name, pid in orphans.items():
            log.warning("supervisor: adopting %s (pid %d), left running by a supervisor that died", name, pid)
            self.children[name] = AdoptedChild(pid)
            self.running[name] = specs[name]
            self.state[name] = state[name]

    def _request_stop(self, signum: int, _frame: object) -> None:
        log.info("supervisor: signal %s, stopping children", signum)
        self.stopping = True

    def _base_env(self) -> dict[str, str]:
        """The children's environment; the embedded Redis (unless REDIS_URL is configured) is
        watched from here on and its URL added once it has started."""
        env = {"TOKENMILL_DATA_DIR": str(self.config.data_dir)}
        if self.config.redis_url:
            env["TOKENMILL_REDIS_URL"] = self.config.redis_url
        else:
            from tokenmill.common.platform.redis_embedded import EmbeddedRedis

            server = EmbeddedRedis(self.config.data_dir, port_wait_s=REDIS_PORT_WAIT_SECONDS)
            self.redis = RedisWatch(server)
        return env

    def _converge(self, base_env: dict[str, str]) -> None:
        if self.redis is not None:
            self.redis.check(time.time())
            if self.redis.url is None:  # never started yet: the children would have no Redis URL
                self._write_state()
                return
            base_env = {**base_env, "TOKENMILL_REDIS_URL": self.redis.url}
        desired = {spec.name: spec for spec in self.run_dir.read_processes()}
        for name in list(self.children):
            if name not in desired:
                self._terminate([name])
                self.children.pop(name)
                self.running.pop(name, None)
                self.state.pop(name, None)
            elif self.running.get(name) != desired[name]:  # e.g. `tokenmill up` rewrote a service's spec
                log.info("supervisor: %s changed; restarting it with its new spec", name)
                self._terminate([name])
                self.children.pop(name)
                self.next_start.pop(name, None)
        now = time.time()
        for name, spec in desired.items():
            child = self.children.get(name)
            code = child.poll() if child is not None else None
            if child is not None and code is None:
                continue
            if child is not None and code is not None:
                self._record_exit(name, code, now)
                self.children.pop(name)
            if now >= self.next_start.get(name, 0.0):
                self._spawn(spec, base_env)
        self._write_state()

    def _write_state(self) -> None:
        state = {n: asdict(s) for n, s in self.state.items()}
        if self.redis is not None:
            state[REDIS_ROW] = asdict(self.redis.state)
        _write_json_atomic(self.run_dir.state, state)

    def _record_exit(self, name: str, code: int, now: float) -> None:
        state = self.state[name]
        state.last_exit = code
        ran_for = now - state.started_at
        backoff = 0.0 if ran_for > HEALTHY_RESET_SECONDS else _backoff(state.restarts)
        self.next_start[name] = now + backoff
        log.warning(
            "supervisor: %s exited with %s after %.1fs; restart in %.1fs", name, code, ran_for, backoff
        )

    def _spawn(self, spec: ProcessSpec, base_env: dict[str, str]) -> None:
        env = {**os.environ, **base_env, **spec.env}
        log_file = open(self.run_dir.logs / f"{spec.name}.log", "ab")  # noqa: SIM115 - owned by the child
        child = subprocess.Popen(
            spec.argv, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        log_file.close()
        previous = self.state.get(spec.name)
        restarts = previous.restarts + 1 if previous else 0
        last_exit = previous.last_exit if previous else None
        self.state[spec.name] = ChildState(child.pid, time.time(), restarts, last_exit)
        self.children[spec.name] = child
        self.running[spec.name] = spec
        (self.run_dir.path / f"{spec.name}.pid").write_text(str(child.pid))

    def _terminate(self, names: Iterable[str]) -> None:
        procs = {n: self.children[n] for n in names if n in self.children}
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + STOP_GRACE_SECONDS
        for name, proc in procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                log.warning("supervisor: %s ignored SIGTERM; killing its process group", name)
                _kill_group(proc.pid)
                proc.wait()
            (self.run_dir.path / f"{name}.pid").unlink(missing_ok=True)

    def _stop_all(self) -> None:
        self._terminate(list(self.children))
        self.children.clear()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


# --- what the CLI calls -------------------------------------------------------------------------


class PortInUseError(RuntimeError):
    """A port a service needs is held by another process: the real cause of an UNREACHABLE service."""


def check_ports_free(config: Config, skip: Iterable[str] = ()) -> None:
    """PortInUseError naming every service port (gRPC or metrics) another process holds, and who;
    the services in `skip` (still running, to be adopted) are not checked."""
    from tokenmill.common.platform.redis_embedded import port_bindable, port_holders

    skipped, taken = set(skip), []
    for name in (n for n in SERVICE_NAMES if n not in skipped):
        svc = config.service(name)
        for kind, port in (("gRPC", svc.port), ("metrics", svc.effective_metrics_port)):
            if not port_bindable(svc.host, port):
                taken.append(f"{name} {kind} port {svc.host}:{port} (held by {port_holders(port)})")
    if taken:
        raise PortInUseError(
            f"already in use by another process: {', '.join(taken)}; stop that process or set "
            "services.<name>.port / metrics_port in the config"
        )


def up(config: Config, config_path: str | None, timeout: float = 60.0) -> dict[str, str]:
    """Start (or join) the local platform and wait until every service is SERVING. A fresh start
    first checks the service ports: one taken by another process fails at once, naming it."""
    run_dir = RunDir(config.data_dir)
    run_dir.ensure()
    if run_dir.supervisor_running() is None:  # its orphans hold their ports: the new one adopts them
        check_ports_free(config, skip=run_dir.orphans())
    existing = {s.name: s for s in run_dir.read_processes() if s.name not in SERVICE_NAMES}
    run_dir.write_processes([*service_specs(config, config_path), *existing.values()])
    if run_dir.supervisor_running() is None:
        argv = [
            sys.executable,
            "-m",
            "tokenmill.common.platform.launcher",
            "supervise",
            "--data-dir",
            str(config.data_dir),
        ]
        if config_path:
            argv += ["--config", config_path]
        with open(run_dir.logs / "supervisor.log", "ab") as log_file:
            subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    return wait_healthy(config, timeout)


def wait_healthy(config: Config, timeout: float, names: Iterable[str] = SERVICE_NAMES) -> dict[str, str]:
    """Poll grpc.health.v1 until every named service is SERVING; raise TimeoutError naming the laggards."""
    addresses = {n: config.service(n).address for n in names}
    deadline = time.time() + timeout
    status: dict[str, str] = {}
    while True:
        status = {n: health_status(config, a) for n, a in addresses.items()}
        if all(s == "SERVING" for s in status.values()):
            return addresses
        if time.time() > deadline:
            lagging = ", ".join(f"{n}={s}" for n, s in status.items() if s != "SERVING")
            logs = config.data_dir / "logs"
            raise TimeoutError(f"not SERVING after {timeout:.0f}s: {lagging} (logs in {logs})")
        time.sleep(0.25)


def down(config: Config, timeout: float = 60.0) -> bool:
    """Stop the supervisor (which stops its children and Redis); kill anything it left behind."""
    run_dir = RunDir(config.data_dir)
    pid = run_dir.supervisor_running()
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + timeout
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    for name, state in run_dir.read_state().items():
        if name != REDIS_ROW and _alive(state.pid):  # Redis is shut down cleanly below
            log.warning("down: %s (pid %s) outlived its supervisor; killing it", name, state.pid)
            _kill_group(state.pid)
    if not config.redis_url:
        from tokenmill.common.platform.redis_embedded import EmbeddedRedis

        EmbeddedRedis(config.data_dir).stop()
    return pid is not None


def add_processes(config: Config, specs: Iterable[ProcessSpec]) -> None:
    """Add (or replace) supervised processes, e.g. inference replicas; requires `tokenmill up`."""
    run_dir = RunDir(config.data_dir)
    if run_dir.supervisor_running() is None:
        if run_dir.orphans():
            raise RuntimeError(
                "the platform's supervisor is not running (killed?) though its processes are; "
                "run `tokenmill up` to take them back, then retry"
            )
        raise RuntimeError("the platform is not running; start it with `tokenmill up`")
    table = {s.name: s for s in run_dir.read_processes()}
    table.update({s.name: s for s in specs})
    run_dir.write_processes(table.values())


def remove_processes(config: Config, names: Iterable[str]) -> None:
    run_dir = RunDir(config.data_dir)
    drop = set(names)
    run_dir.write_processes([s for s in run_dir.read_processes() if s.name not in drop])


def process_table(config: Config) -> list[dict[str, object]]:
    """Each supervised process (the embedded Redis too) with its pid, restarts, live health and,
    where its last start failed, why (for `tokenmill status`)."""
    run_dir = RunDir(config.data_dir)
    state = run_dir.read_state()
    rows: list[dict[str, object]] = []
    for spec in run_dir.read_processes():
        child = state.get(spec.name)
        rows.append(
            {
                "name": spec.name,
                "address": spec.health_address,
                "pid": child.pid if child is not None and _alive(child.pid) else None,
                "restarts": child.restarts if child else 0,
                "health": health_status(config, spec.health_address) if spec.health_address else "n/a",
            }
        )
    if REDIS_ROW in state and not config.redis_url:
        rows.insert(0, _redis_row(config, state[REDIS_ROW]))
    return rows


def _redis_row(config: Config, child: ChildState) -> dict[str, object]:
    """The embedded Redis's row: live health from PING, and the supervisor's last start error."""
    from tokenmill.common.platform.redis_embedded import EmbeddedRedis

    server = EmbeddedRedis(config.data_dir)
    rec = server.recorded()
    parts = urlsplit(rec[0]) if rec else None
    return {
        "name": REDIS_ROW,
        "address": f"{parts.hostname}:{parts.port}" if parts else "",
        "pid": child.pid if _alive(child.pid) else None,
        "restarts": child.restarts,
        "health": "SERVING" if server.running() else "DOWN",
        "error": child.error,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.common.platform.launcher")
    parser.add_argument("command", choices=["supervise"])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = load_config(args.config, data_dir=Path(args.data_dir))
    Supervisor(config, RunDir(config.data_dir)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
