"""Run untrusted model-written Python under limits: time, memory, files, processes, network.

Generated code is executed to score pass@k, so it must not reach the network, write outside its
own temporary directory, start processes or outlive its time. Three layers, each enough for the
common case and together hard to get around from Python:

* a child process with rlimits (address space, CPU seconds, file size, open files, no core dumps),
  its own session (the whole group is killed at the deadline) and an empty environment;
* a fresh network namespace when the kernel lets an unprivileged user create one (then there is no
  interface but a down loopback at all);
* a PEP 578 audit hook installed before the candidate runs, which cannot be removed from Python:
  it refuses sockets, process creation, ctypes, and any write, rename, delete or mode change
  outside the temporary directory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

PASSED, FAILED, TIMEOUT, MEMORY, REFUSED = "passed", "failed", "timeout", "memory", "refused"
_REFUSED_EXIT = 86  # the audit hook's exit status when the candidate tried something it may not
_MEMORY_EXIT = 87
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000

# Runs in the child before the candidate; the candidate's source arrives on stdin.
_BOOTSTRAP = r"""
import os, sys
ROOT = os.path.realpath(sys.argv[1])
REFUSED, MEMORY = int(sys.argv[2]), int(sys.argv[3])
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.fork", "os.forkpty",
           "os.spawn", "os.kill", "os.killpg", "ctypes.", "pty.", "shutil.chown", "os.chown", "os.setuid",
           "sys.remote_exec", "os.startfile", "winreg.", "webbrowser.")
PATH_EVENTS = ("os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.link", "os.symlink",
               "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile")

def inside(path):
    if isinstance(path, int):
        return True  # an already-open descriptor: its opening was checked
    full = os.path.realpath(os.fsdecode(path))
    return full == ROOT or full.startswith(ROOT + os.sep)

def refuse(what):
    sys.stderr.write(f"sandbox: refused {what}\n")
    sys.stderr.flush()
    os._exit(REFUSED)

def hook(event, args):
    if event.startswith(BLOCKED):
        refuse(event)
    if event == "open":
        path, mode, flags = args
        writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (flags & WRITE_FLAGS)
        if writes and path is not None and not inside(path):
            refuse(f"writing {path!r} outside the sandbox directory")
    elif event in PATH_EVENTS:
        for path in args[:2]:
            if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                refuse(f"{event} on {os.fsdecode(path)!r} outside the sandbox directory")

source = sys.stdin.read()
code = compile(source, "<candidate>", "exec")
sys.addaudithook(hook)
try:
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
except MemoryError:
    os._exit(MEMORY)
"""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    memory_bytes: int = 512 << 20
    file_bytes: int = 16 << 20
    open_files: int = 64


@dataclass(frozen=True)
class SandboxResult:
    status: str  # PASSED, FAILED, TIMEOUT, MEMORY or REFUSED
    returncode: int
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def _try_private_network() -> None:
    """A new user+network namespace: no route anywhere. Silently skipped where the kernel forbids it."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET)  # failure leaves the audit hook as the network guard


def _limit_child(limits: SandboxLimits) -> None:
    """preexec_fn: runs in the child between fork and exec."""
    os.setsid()
    cpu = max(1, int(limits.timeout_s) + 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _try_private_network()


def _status(returncode: int) -> str:
    if returncode == 0:
        return PASSED
    if returncode == _REFUSED_EXIT:
        return REFUSED
    if returncode == _MEMORY_EXIT:
        return MEMORY
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return TIMEOUT
    return FAILED


def run_python(source: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Execute ``source`` in a sandboxed interpreter; PASSED means it exited 0 (e.g. its asserts held)."""
    limits = limits or SandboxLimits()
    with tempfile.TemporaryDirectory(prefix="tokenmill-sandbox-") as root:
        env = {"PATH": "/usr/bin:/bin", "HOME": root, "TMPDIR": root, "PYTHONDONTWRITEBYTECODE": "1"}
        argv = [sys.executable, "-I", "-c", _BOOTSTRAP, root, str(_REFUSED_EXIT), str(_MEMORY_EXIT)]
        proc = subprocess.Popen(
            argv,
            cwd=root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: _limit_child(limits),  # noqa: PLW1509 - needed for rlimits/setsid
            text=True,
        )
        try:
            out, err = proc.communicate(source, timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return SandboxResult(TIMEOUT, proc.returncode, out, err)
        return SandboxResult(_status(proc.returncode), proc.returncode, out, err)
