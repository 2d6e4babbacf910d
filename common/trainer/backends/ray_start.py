"""Bring up the trainer's Ray connection: bounded, retried, and failing with a reason a person can act on.

``ray.init()`` has no overall timeout: against an unreachable ``RAY_ADDRESS`` it keeps retrying the
GCS, and a local start on a loaded machine can wait long for its GCS. Here every attempt runs within
one deadline for all attempts together: a cluster address is first probed over TCP (an unreachable
GCS fails in seconds, not minutes), ``ray.init`` runs in a helper thread the caller stops waiting
for at the deadline, and a failed attempt is shut down and retried after a short backoff. When no
attempt succeeds the caller gets FAILED_PRECONDITION naming the address (or the local start) and
the timeout. Ray is imported lazily (engine packages stay importable without it).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenmill.common.errors import FailedPrecondition

REPO_ROOT = str(Path(__file__).resolve().parents[3])
LOCAL_ADDRESSES = ("", "local", "auto")


def gcs_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) to probe for a cluster address (``host:port`` or ``ray://host:port``);
    None for a local start or ``auto`` (nothing to probe)."""
    if address in LOCAL_ADDRESSES:
        return None
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise FailedPrecondition(
            f"RAY_ADDRESS={address!r} is not host:port (e.g. 10.0.0.5:6379) or ray://host:port"
        )
    return host.strip("[]"), int(port)


def _probe(endpoint: tuple[str, int], timeout_s: float) -> None:
    """Raise OSError unless a TCP connection to the GCS opens within ``timeout_s``."""
    with socket.create_connection(endpoint, timeout=max(0.1, timeout_s)):
        pass


# Never set: the thread that started a local Ray parks on it for the process's life (see below).
_HOLD = threading.Event()


def _init_within(init: Callable[[], Any], timeout_s: float) -> BaseException | None:
    """Run ``init`` in a helper thread; its exception, TimeoutError when it outlasts ``timeout_s``
    (the thread is left to finish on its own: ray.init cannot be interrupted), else None.

    After a successful init the thread stays parked: a local Ray's GCS and raylet are started with
    PR_SET_PDEATHSIG, which Linux fires when the *thread* that forked them exits, not the process;
    a returning helper thread would take the fresh cluster down with it a moment later."""
    outcome: list[BaseException | None] = []
    done = threading.Event()

    def run() -> None:
        try:
            init()
        except BaseException as exc:  # reported to the caller, which decides on a retry
            outcome.append(exc)
            done.set()
            return
        outcome.append(None)
        done.set()
        _HOLD.wait()

    thread = threading.Thread(target=run, name="ray-init", daemon=True)
    thread.start()
    if not done.wait(timeout_s):
        return TimeoutError(f"ray.init did not return within {timeout_s:.1f}s")
    return outcome[0]


def _default_init(address: str) -> None:
    import ray

    ray.init(
        address=None if address in LOCAL_ADDRESSES else address,
        runtime_env={"env_vars": {"PYTHONPATH": REPO_ROOT}},
        include_dashboard=False if address in LOCAL_ADDRESSES else None,
        log_to_driver=False,
    )


def _default_cleanup() -> None:
    import ray

    ray.shutdown()


def start_ray(address: str = "", *, timeout_s: float = 120.0, attempts: int = 3) -> None:
    """Connect to ``address`` (else $RAY_ADDRESS; empty: start a local Ray) unless already connected."""
    import ray

    if not ray.is_initialized():
        bounded_start(address or os.environ.get("RAY_ADDRESS", ""), timeout_s=timeout_s, attempts=attempts)


def bounded_start(
    address: str,
    *,
    timeout_s: float,
    attempts: int,
    init: Callable[[str], None] = _default_init,
    cleanup: Callable[[], None] = _default_cleanup,
    backoff_s: float = 1.0,
) -> None:
    """Up to ``attempts`` tries of ``init(address)`` within ``timeout_s`` in all (``cleanup`` after a
    failed one); FailedPrecondition naming the address and the timeout when none succeeds."""
    endpoint = gcs_endpoint(address)
    deadline = time.monotonic() + timeout_s
    errors: list[str] = []
    for attempt in range(1, attempts + 1):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            if endpoint is not None:
                _probe(endpoint, min(5.0, remaining))
        except OSError as exc:
            errors.append(f"GCS {address} unreachable ({exc.strerror or exc})")
        else:
            failure = _init_within(lambda: init(address), deadline - time.monotonic())
            if failure is None:
                return
            errors.append(f"{type(failure).__name__}: {failure}")
            if isinstance(failure, TimeoutError):
                break  # the stuck ray.init still runs: another attempt would race it
            cleanup()
        if attempt < attempts:
            time.sleep(min(backoff_s * 2 ** (attempt - 1), max(0.0, deadline - time.monotonic())))
    raise FailedPrecondition(_failure_message(address, timeout_s, len(errors), errors[-1] if errors else ""))


def _failure_message(address: str, timeout_s: float, tried: int, last: str) -> str:
    if address in LOCAL_ADDRESSES:
        what = "could not start a local Ray instance (RAY_ADDRESS is unset)"
        hint = "raise trainer.ray_start_timeout_seconds on a loaded machine, or set RAY_ADDRESS to a running cluster"
    else:
        what = f"could not connect to the Ray cluster at RAY_ADDRESS={address}"
        hint = "check that the cluster is up and RAY_ADDRESS names its GCS (head host:6379), or unset it to start a local Ray"
    return f"{what} within the {timeout_s:g}s start timeout ({tried} attempt(s); last: {last}); {hint}"
