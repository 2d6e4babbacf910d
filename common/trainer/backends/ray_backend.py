"""`ray` backend: the same worker code under Ray Train (``TorchTrainer``) on an existing Ray cluster.

Ray creates the process group (gloo on CPU, NCCL on GPU) and the worker processes; our loop detects
the initialised group and runs unchanged. Rank 0's reports and the stop flag travel through two
``ray.util.queue.Queue`` actors. Ray's own retries are off (``max_failures=0``): the job system owns
retries, and a retried attempt resumes from the run's last checkpoint exactly as with `local`.
Ray is imported lazily so the engine package stays importable without it.

Workers die with the trainer service here too, by Ray's ownership rather than ours (lifeline.py
would be wrong: a Ray worker's parent is the raylet, not the service). The service is the Ray
driver; the TorchTrainer's actors belong to its Ray job, and when the driver dies the cluster ends
that job and kills its non-detached actors. A cluster that ``ray.init()`` started itself (no
address) is the service's children, which Ray starts fate-shared (PR_SET_PDEATHSIG on Linux).
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from tokenmill.common.trainer.backends.local import WorkerFailed
from tokenmill.common.trainer.backends.ray_start import start_ray
from tokenmill.common.trainer.checkpoint_io import IoFactory
from tokenmill.common.trainer.config import TrainConfig
from tokenmill.common.trainer.local_io import local_checkpoint_io


class _RayChannel:
    def __init__(self, events: Any, control: Any):
        self.events, self.control = events, control
        self._stop = False

    def report(self, kind: str, data: dict[str, Any]) -> None:
        self.events.put((kind, data))

    def stop_requested(self) -> bool:
        if not self._stop and not self.control.empty():
            self._stop = True
        return self._stop


def _train_loop(config: dict[str, Any]) -> None:
    """Runs inside each Ray Train worker."""
    import ray.train
    import torch

    from tokenmill.common.trainer.checkpoint_io import resolve_io_factory
    from tokenmill.common.trainer.errors_wire import error_to_wire
    from tokenmill.common.trainer.worker import train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    os.environ.setdefault("LOCAL_RANK", str(ctx.get_local_rank()))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))
    cfg = TrainConfig.from_dict(config["cfg"])
    channel = _RayChannel(config["events"], config["control"])
    try:
        result = train(cfg, resolve_io_factory(config["io_factory"])(config["io_spec"]), channel)
        if rank == 0:
            config["events"].put(("result", result))
    except BaseException as exc:
        config["events"].put(("error", {"rank": rank, **error_to_wire(exc)}))
        raise


def run_ray(
    cfg: TrainConfig,
    io_spec: dict[str, Any],
    *,
    on_event: Callable[[str, dict[str, Any]], None] = lambda kind, data: None,
    should_stop: Callable[[], bool] = lambda: False,
    ray_address: str = "",
    ray_start_timeout_s: float = 120.0,
    ray_start_attempts: int = 3,
    storage_path: str = "",
    poll_s: float = 0.2,
    io_factory: IoFactory | str = local_checkpoint_io,
) -> dict[str, Any]:
    """Run one attempt with ``cfg.workers`` Ray Train workers; returns rank 0's result dict.

    ``io_factory`` builds each worker's CheckpointIO (see `run_local`); a callable must be importable
    by reference on the Ray workers (module-level), which a ``"module:function"`` path always is.
    Ray itself is reached or started by `start_ray` (bounded by ``ray_start_timeout_s``)."""
    start_ray(ray_address, timeout_s=ray_start_timeout_s, attempts=ray_start_attempts)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    use_gpu = cfg.device == "cuda"
    events, control = Queue(), Queue()
    storage = storage_path or tempfile.mkdtemp(prefix="tokenmill-ray-")
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "io_spec": dict(io_spec),
            "io_factory": io_factory,
            "events": events,
            "control": control,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=f"train-{cfg.run_id or 'adhoc'}",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # surfaced below with the worker's own error if it sent one
            failure.append(exc)

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    stop_sent = False
    try:
        while thread.is_alive() or not events.empty():
            if should_stop() and not stop_sent:
                control.put("stop")
                stop_sent = True
            try:
                kind, data = events.get(timeout=poll_s)
            except (Empty, queue.Empty):  # ray raises RayTaskError(Empty), a subclass of its Empty
                continue
            if kind == "result":
                result = data
            elif kind == "error":
                error = error or data
            else:
                on_event(kind, data)
        thread.join()
    finally:
        for q in (events, control):
            q.shutdown()
    if error is not None:
        from tokenmill.common.trainer.errors_wire import error_from_wire

        raise error_from_wire(error)
    if result is None:
        why = f": {failure[0]}" if failure else ""
        raise WorkerFailed(f"a Ray Train worker failed{why}; the job resumes from its last checkpoint")
    return result
