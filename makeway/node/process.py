"""Signals to worker process groups and reading their run state."""

from __future__ import annotations

import os
import signal

import psutil


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


def group_members(pgid: int) -> list[int]:
    """Return the pids in process group `pgid`."""
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid:
                members.append(pid)
        except (ProcessLookupError, PermissionError):
            continue
    return members


def kill_group_members(pgid: int) -> int:
    """SIGKILL every process of group `pgid` except the caller; return how many were signalled.

    A process re-parented to init after its parent exited stays in the group,
    so this reaches grandchildren that a job's shell left behind.
    """
    killed = 0
    for pid in group_members(pgid):
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed


def kill_escaped_children(pgid: int) -> list[tuple[int, str]]:
    """SIGKILL the caller's descendants that left process group `pgid`; return their pids and commands.

    A job's child that called setsid() or setpgid() no longer gets the
    signals sent to the group. It stays findable through its parent links
    only while its parent lives: a daemon that forked twice is found by
    neither this nor the group sweep.
    """
    escaped = []
    for child in psutil.Process().children(recursive=True):
        try:
            if os.getpgid(child.pid) == pgid:
                continue
            command = " ".join(child.cmdline()) or child.name()
            child.kill()
            escaped.append((child.pid, command))
        except (ProcessLookupError, psutil.Error):
            continue
    return escaped


def cpu_seconds(process: psutil.Process) -> float | None:
    """Return the CPU time of `process` and its waited-for children, or None if it is gone."""
    try:
        times = process.cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system + times.children_user + times.children_system
