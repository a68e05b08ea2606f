"""How a child process the engine spawned (the engine-core process, a tensor-parallel rank) ended, in words."""

from __future__ import annotations

import signal
from multiprocessing.process import BaseProcess

_EXIT_WAIT_S = 5.0  # a child's pipe closes a moment before its exit status is known


def exit_reason(process: BaseProcess, wait_s: float = _EXIT_WAIT_S) -> str:
    """'killed by SIGKILL', 'exited with code 1', or that it is still running after `wait_s` seconds."""
    process.join(timeout=wait_s)
    code = process.exitcode
    if code is None:
        return "its pipe closed but it is still running"
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
