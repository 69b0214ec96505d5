"""Signals to worker process groups and reading their run state."""

from __future__ import annotations

import os
import signal


def signal_group(pid: int, signum: int) -> bool:
    """Send `signum` to the process group led by `pid`; False if it is gone."""
    try:
        os.killpg(pid, signum)
        return True
    except ProcessLookupError:
        return False


def process_state(pid: int) -> str | None:
    """Return the kernel's one-letter state of `pid` ('R', 'S', 'T', 'Z', ...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name in parentheses may itself contain spaces and ')'.
    return data[data.rindex(b")") + 2:data.rindex(b")") + 3].decode()


def is_stopped(pid: int) -> bool:
    """True once a SIGSTOP has taken effect (or the process is gone)."""
    state = process_state(pid)
    return state is None or state in ("T", "t", "Z", "X")


STOP = signal.SIGSTOP
CONTINUE = signal.SIGCONT
