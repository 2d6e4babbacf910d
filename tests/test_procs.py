"""tokenmill.common.procs.pid_alive: the one 'is this process alive' check (launcher pid files, ingest temps)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from tokenmill.common.procs import pid_alive


def test_running_process_is_alive():
    assert pid_alive(os.getpid())


def test_nonsense_pids_are_not_alive():
    assert not pid_alive(0)  # os.kill(0, 0) would signal our own process group
    assert not pid_alive(-1)


def test_zombie_then_reaped_child_is_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:  # exited, not yet reaped
        assert time.monotonic() < deadline, "child never exited"
        time.sleep(0.02)
    assert not pid_alive(child.pid), "a zombie must count as dead"
    child.wait()
    assert not pid_alive(child.pid)


def test_another_users_process_counts_as_alive():
    assert pid_alive(1)  # init: exists, maybe not ours to inspect
