"""`local` backend: N worker processes on this machine (torchrun-style env; gloo on CPU, NCCL on GPU).

The parent relays rank 0's reports through a multiprocessing queue to ``on_event`` and forwards a
stop request through an Event. Workers die with the parent (lifeline.py): a killed trainer service
leaves no worker training on behind the job system's back. If any worker dies (crash, OOM kill,
SIGKILL), the others are terminated and :class:`WorkerFailed` is raised: the job system retries the
attempt, which resumes from the run's last checkpoint.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import time
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from tokenmill.common.trainer.checkpoint_io import IoFactory, resolve_io_factory
from tokenmill.common.trainer.config import TrainConfig
from tokenmill.common.trainer.lifeline import die_with_parent
from tokenmill.common.trainer.local_io import local_checkpoint_io
from tokenmill.common.trainer.parallel import free_port


class WorkerFailed(RuntimeError):
    """A worker process exited abnormally; the attempt can be retried from the last checkpoint."""


class _QueueChannel:
    def __init__(self, q: Any, stop: Any):
        self.q, self.stop = q, stop

    def report(self, kind: str, data: dict[str, Any]) -> None:
        self.q.put((kind, data))

    def stop_requested(self) -> bool:
        return self.stop.is_set()


def _worker_entry(
    parent_pid: int,
    rank: int,
    world: int,
    port: int,
    cfg_dict: dict,
    io_spec: dict,
    io_factory: IoFactory | str,
    q: Any,
    stop: Any,
) -> None:
    die_with_parent(parent_pid)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # Each worker gets its share of the cores; oversubscription makes CPU training crawl.
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from tokenmill.common.trainer.errors_wire import error_to_wire
    from tokenmill.common.trainer.worker import train

    cfg = TrainConfig.from_dict(cfg_dict)
    try:
        result = train(cfg, resolve_io_factory(io_factory)(io_spec), _QueueChannel(q, stop))
        if rank == 0:
            q.put(("result", result))
    except BaseException as exc:
        q.put(("error", {"rank": rank, **error_to_wire(exc)}))
        raise
    _exit_reported(q)


def _exit_reported(q: Any) -> None:
    """Leave a worker that finished and reported, without interpreter finalization.

    Gloo's C++ threads can still hold tensors at exit even after destroy_process_group; tearing them
    down while the interpreter shuts down aborts the process now and then (SIGABRT, "terminate called
    without an active exception"), which the launcher would rightly read as a crashed worker. Every
    event and the result are flushed to the parent first."""
    q.close()
    q.join_thread()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_local(
    cfg: TrainConfig,
    io_spec: dict[str, Any],
    *,
    on_event: Callable[[str, dict[str, Any]], None] = lambda kind, data: None,
    should_stop: Callable[[], bool] = lambda: False,
    poll_s: float = 0.2,
    io_factory: IoFactory | str = local_checkpoint_io,
) -> dict[str, Any]:
    """Run one attempt with ``cfg.workers`` processes; returns rank 0's result dict.

    ``io_factory`` builds each worker's CheckpointIO from ``io_spec``: a module-level callable (sent
    to the spawned workers by reference) or a ``"module:function"`` path."""
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker_entry,
            args=(os.getpid(), r, cfg.workers, port, cfg.to_dict(), dict(io_spec), io_factory, q, stop),
            name=f"train-worker-{r}",
            daemon=False,
        )
        for r in range(cfg.workers)
    ]
    for p in procs:
        p.start()
    try:
        result, error = _supervise(procs, q, stop, on_event, should_stop, poll_s)
        killed = _killed(procs)
    finally:
        _stop_all(procs)
        q.close()
    if killed:
        raise WorkerFailed(
            f"training worker(s) {killed} died (killed by a signal); the job resumes from its last checkpoint"
        )
    if error is not None:
        from tokenmill.common.trainer.errors_wire import error_from_wire

        raise error_from_wire(error)
    if result is None:
        codes = {p.name: p.exitcode for p in procs}
        raise WorkerFailed(
            f"training worker died (exit codes {codes}); the job resumes from its last checkpoint"
        )
    return result


def _supervise(
    procs: list[Any],
    q: Any,
    stop: Any,
    on_event: Callable[[str, dict[str, Any]], None],
    should_stop: Callable[[], bool],
    poll_s: float,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Relay the workers' events until they all finish or one fails; (rank 0's result, first error)."""
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    while True:
        if should_stop() and not stop.is_set():
            stop.set()
        try:
            kind, data = q.get(timeout=poll_s)
        except queue.Empty:
            kind = ""
        if kind == "result":
            result = data
        elif kind == "error":
            error = error or data
        elif kind:
            on_event(kind, data)
        if error or any(p.exitcode not in (None, 0) for p in procs):
            break
        if all(p.exitcode == 0 for p in procs):
            while result is None:  # the result may still be in the pipe
                try:
                    kind, data = q.get(timeout=5)
                except queue.Empty:
                    break
                if kind == "result":
                    result = data
                elif kind != "error":
                    on_event(kind, data)
            break
    if error is not None and not _killed(procs):
        # A peer's death reaches the survivors as a connection error first; give the dead
        # process a moment to be reaped so the report names the real cause.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not _killed(procs):
            time.sleep(0.05)
    return result, error


def _killed(procs: list[Any]) -> list[str]:
    """Workers that died from a signal before we asked anyone to stop (SIGKILL, OOM killer)."""
    return [f"{p.name} (signal {-p.exitcode})" for p in procs if p.exitcode is not None and p.exitcode < 0]


def _stop_all(procs: list[Any], grace_s: float = 10.0) -> None:
    deadline = time.monotonic() + grace_s
    for p in procs:
        if p.exitcode is None and any(o.exitcode not in (None, 0) for o in procs):
            p.terminate()
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
        if p.exitcode is None:
            p.kill()
            p.join(5)
