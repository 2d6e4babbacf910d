"""Worker processes die with the process that started them.

A training worker that outlives its launcher (the trainer service killed with SIGKILL, OOM-killed,
its node lost) would keep training and committing checkpoints under the run's tag while the job
system retries the job elsewhere: two writers on one run. So every worker ties its life to its
parent's, twice over:

* Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the worker the moment its parent
  goes. The signal is tied to the parent *thread* that spawned the worker, which is the one that
  waits on the workers for the whole attempt (``run_local``). The parent may already be gone when
  the call is made, so the parent pid is checked right after it.
* Everywhere (and in case prctl is unavailable, e.g. a seccomp profile denies it): a daemon thread
  that watches the parent, by the end of the pipe the parent holds (EOF when it dies, whatever the
  pid namespace) and by the parent pid (reparenting changes ``getppid``), and SIGKILLs this process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int, *, poll_s: float = 0.5) -> None:
    """Make this process die (SIGKILL) as soon as ``parent_pid``, its parent, is gone."""
    _set_pdeathsig()
    if not _parent_alive(parent_pid):
        _die()
    thread = threading.Thread(target=_watch, args=(parent_pid, poll_s), name="parent-watch", daemon=True)
    thread.start()


def _set_pdeathsig() -> bool:
    """Ask the kernel for SIGKILL when the parent dies; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _parent_alive(parent_pid: int) -> bool:
    """Still the child of ``parent_pid``: once it dies this process is reparented (to init, a
    subreaper, or 0 when the new parent is outside our pid namespace)."""
    return os.getppid() == parent_pid


def _watch(parent_pid: int, poll_s: float) -> None:
    parent = multiprocessing.parent_process()
    sentinel = parent.sentinel if parent is not None else None
    while _parent_alive(parent_pid):
        if sentinel is not None:
            if multiprocessing.connection.wait([sentinel], timeout=poll_s):
                break  # EOF: the parent's end of the pipe closed with it
        else:
            time.sleep(poll_s)
    _die()


def _die() -> None:
    """SIGKILL, like the kernel's parent-death signal: no cleanup that could touch shared state."""
    os.kill(os.getpid(), signal.SIGKILL)
