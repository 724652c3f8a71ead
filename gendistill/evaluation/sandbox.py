"""Run model-written Python (code benchmarks) in a sandboxed subprocess, never in this process.

Each program runs as `python -I` (isolated: no user site-packages, no PYTHON* variables, no current directory on
the path) in a fresh temporary directory that is deleted afterwards, with a scrubbed environment (no tokens or
credentials of the caller), resource limits (CPU seconds, address space, file size, no core dumps), a wall-clock
time limit that kills its whole process group, and no network: inside `unshare -rn` (a new user and network
namespace with only a down loopback) where the kernel allows it. Where it does not, the program still runs with
the limits above but can reach the network; `isolation()` says which, and the eval manifest records it.
This is a guard against accidents (an endless loop, a `rm -rf`, a runaway allocation), not a security boundary
against a hostile model: run untrusted models' code in a container or VM.
"""
from __future__ import annotations

import functools
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MEMORY_BYTES = 2 << 30  # address space per program
FILE_BYTES = 16 << 20  # largest file a program may write


@dataclass
class Outcome:
    passed: bool  # exited 0 within the time limit
    status: str  # "passed", "failed", "timeout"
    output: str  # the tail of stderr (or stdout), for the records


@functools.lru_cache(maxsize=None)
def _unshare_prefix() -> tuple[str, ...]:
    """`unshare -rn --` when an unprivileged network namespace can be made here, else nothing."""
    try:
        ok = subprocess.run(["unshare", "-rn", "--", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return ("unshare", "-rn", "--") if ok else ()


def isolation() -> str:
    return ("network namespace (unshare -rn), rlimits, scrubbed env, temp dir" if _unshare_prefix()
            else "rlimits, scrubbed env, temp dir (no network namespace available: the network is reachable)")


def _limits(cpu_seconds: int) -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(program: str, timeout: float = 10.0) -> Outcome:
    """Run `program` sandboxed; passed = exit status 0 within `timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="gendistill-exec-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        cmd = [*_unshare_prefix(), sys.executable, "-I", "-B", str(path)]
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=functools.partial(_limits, max(1, int(timeout) + 1)))
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the program's children too (its own session)
            proc.communicate()
            return Outcome(False, "timeout", f"killed after {timeout:g} s")
        text = (stderr or stdout).decode(errors="replace")[-500:]
        return Outcome(proc.returncode == 0, "passed" if proc.returncode == 0 else "failed", text)
