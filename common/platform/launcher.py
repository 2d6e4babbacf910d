"""Local launcher: the embedded Redis and every service as supervised processes on loopback.

`tokenmill up` starts a detached supervisor (`python -m tokenmill.common.platform.launcher supervise`) and waits
until every service answers SERVING on grpc.health.v1. The supervisor owns the children: it
restarts a crashed one with exponential backoff, writes logs and pids under
`<data_dir>/logs` and `<data_dir>/run`, and on SIGTERM stops them all (SIGTERM, grace, SIGKILL).
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


@dataclass
class ProcessSpec:
    """One supervised child: a name, an argv and extra environment."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_address: str = ""  # host:port answering grpc.health.v1, if any


@dataclass
class ChildState:
    pid: int
    started_at: float
    restarts: int = 0
    last_exit: int | None = None


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


class Supervisor:
    """Keeps the process table converged: start what is missing, restart what died, stop what was removed."""

    def __init__(self, config: Config, run_dir: RunDir):
        self.config = config
        self.run_dir = run_dir
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.state: dict[str, ChildState] = {}
        self.next_start: dict[str, float] = {}
        self.stopping = False
        self.redis: EmbeddedRedis | None = None

    def run(self) -> None:
        self.run_dir.ensure()
        self.run_dir.supervisor_pid.write_text(str(os.getpid()))
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        env = self._start_redis()
        try:
            while not self.stopping:
                self._converge(env)
                time.sleep(0.3)
        finally:
            self._stop_all()
            if self.redis is not None:
                self.redis.stop()
            self.run_dir.state.unlink(missing_ok=True)
            self.run_dir.supervisor_pid.unlink(missing_ok=True)

    def _request_stop(self, signum: int, _frame: object) -> None:
        log.info("supervisor: signal %s, stopping children", signum)
        self.stopping = True

    def _start_redis(self) -> dict[str, str]:
        """Start the embedded Redis unless a REDIS_URL is configured; children get its URL."""
        env = {"TOKENMILL_DATA_DIR": str(self.config.data_dir)}
        if self.config.redis_url:
            env["TOKENMILL_REDIS_URL"] = self.config.redis_url
            return env
        from tokenmill.common.platform.redis_embedded import EmbeddedRedis

        self.redis = EmbeddedRedis(self.config.data_dir)
        self.redis.start()
        env["TOKENMILL_REDIS_URL"] = self.redis.url
        return env

    def _converge(self, base_env: dict[str, str]) -> None:
        if self.redis is not None and not self.redis.alive():
            log.warning("supervisor: embedded redis died; restarting it")
            self.redis.start()
        desired = {spec.name: spec for spec in self.run_dir.read_processes()}
        for name in list(self.children):
            if name not in desired:
                self._terminate([name])
                self.children.pop(name)
                self.state.pop(name, None)
        now = time.time()
        for name, spec in desired.items():
            child = self.children.get(name)
            if child is not None and child.poll() is None:
                continue
            if child is not None:
                self._record_exit(name, child.returncode, now)
                self.children.pop(name)
            if now >= self.next_start.get(name, 0.0):
                self._spawn(spec, base_env)
        _write_json_atomic(self.run_dir.state, {n: asdict(s) for n, s in self.state.items()})

    def _record_exit(self, name: str, code: int, now: float) -> None:
        state = self.state[name]
        state.last_exit = code
        ran_for = now - state.started_at
        backoff = (
            0.0
            if ran_for > HEALTHY_RESET_SECONDS
            else min(MAX_BACKOFF_SECONDS, 2.0 ** min(state.restarts, 5))
        )
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


def up(config: Config, config_path: str | None, timeout: float = 60.0) -> dict[str, str]:
    """Start (or join) the local platform and wait until every service is SERVING."""
    run_dir = RunDir(config.data_dir)
    run_dir.ensure()
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
        if _alive(state.pid):
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
        raise RuntimeError("the platform is not running; start it with `tokenmill up`")
    table = {s.name: s for s in run_dir.read_processes()}
    table.update({s.name: s for s in specs})
    run_dir.write_processes(table.values())


def remove_processes(config: Config, names: Iterable[str]) -> None:
    run_dir = RunDir(config.data_dir)
    drop = set(names)
    run_dir.write_processes([s for s in run_dir.read_processes() if s.name not in drop])


def process_table(config: Config) -> list[dict[str, object]]:
    """Each supervised process with its pid, restarts and live health (for `tokenmill status`)."""
    run_dir = RunDir(config.data_dir)
    state = run_dir.read_state()
    rows: list[dict[str, object]] = []
    for spec in run_dir.read_processes():
        child = state.get(spec.name)
        live_pid = child.pid if child is not None and _alive(child.pid) else None
        rows.append(
            {
                "name": spec.name,
                "address": spec.health_address,
                "pid": live_pid,
                "restarts": child.restarts if child else 0,
                "health": health_status(config, spec.health_address) if spec.health_address else "n/a",
            }
        )
    return rows


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
