"""Whether a process is alive, answered one way everywhere (launcher pid files, ingest temp-dir owners).

`os.kill(pid, 0)` alone is not enough: a zombie (exited, not yet reaped by its parent) still
"exists", and pid 0 would signal our own process group. psutil answers both portably.
"""

from __future__ import annotations

import psutil

_GONE = frozenset({psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD})


def pid_alive(pid: int) -> bool:
    """True while `pid` names a running (not zombie) process; a process we may not inspect counts as
    alive, since it exists and is someone else's."""
    if pid <= 0 or not psutil.pid_exists(pid):
        return False
    try:
        return psutil.Process(pid).status() not in _GONE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
