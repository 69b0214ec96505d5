"""CPU and I/O priority of the node's processes.

The supervisor and its interactive workers may run above the default
priority (`policy.node_nice`), so that under load they react before other
normal processes. Background workers drop to `policy.background_nice` and, by
default, to SCHED_IDLE. Both nice settings are absolute values, not
increments, so a background worker ends at its own value whatever the
supervisor's.
"""

from __future__ import annotations

import logging
import os
import resource

logger = logging.getLogger(__name__)

# `policy.node_nice` value that leaves the node at the priority it started with.
INHERIT = "inherit"


def _thread_ids() -> list[int]:
    """Return the ids of this process's threads, since on Linux nice is a per-thread value."""
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def set_node_priority(nice: int | str) -> int:
    """Set every thread of this process to `nice` and return the nice value in effect.

    Threads started later inherit it from the thread that starts them, and
    so do worker processes. A negative value needs CAP_SYS_NICE or a
    RLIMIT_NICE that allows it. Without either, the node keeps its priority
    and logs a warning that names the setting and the fixes.
    """
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice == INHERIT or nice == current:
        return current
    # The threads share credentials and, at start, one nice value. So a
    # refusal comes at the first thread, before any value has changed.
    try:
        for tid in _thread_ids():
            try:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            except ProcessLookupError:
                pass  # the thread ended after the listing
    except PermissionError:
        logger.warning(
            "Failed to set the node's CPU priority to nice %d (policy.node_nice): that needs CAP_SYS_NICE or an "
            "RLIMIT_NICE of at least %d, and this process has neither (RLIMIT_NICE %s). The node stays at nice %d, "
            "so interactive jobs may wait longer under load. Fix: grant the limit (systemd: LimitNICE=%d; shell: "
            "ulimit -e %d) or the capability, start the node at that value (systemd: Nice=%d), or set "
            "policy.node_nice = %r in makeway.toml to keep the inherited value without this warning",
            nice, 20 - nice, _nice_limit(), current, 20 - nice, 20 - nice, nice, INHERIT,
        )
        return current
    logger.debug("Node runs at nice %d", nice)
    return nice


def _nice_limit() -> str:
    """Return this process's soft RLIMIT_NICE as text. The kernel allows nice values down to 20 minus the limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


def set_worker_priority(nice: int | None, ionice: str, cpu_policy: str = "normal") -> None:
    """Set this worker process's CPU and I/O priority; children inherit both.

    `nice` None keeps the nice value inherited from the supervisor. A
    background worker passes its own value, which is applied even when it is
    0, since the supervisor may run below 0. `cpu_policy` "idle" selects
    SCHED_IDLE: the kernel runs the process only when no normal process wants
    the core, and a waking normal process preempts it at once.
    """
    import psutil

    if cpu_policy == "idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    if nice is not None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except PermissionError:
            # Without CAP_SYS_NICE the kernel rejects only a value below the inherited one.
            logger.warning("Failed to set the nice value of worker pid=%d to %d: permission denied; it keeps nice %d",
                           os.getpid(), nice, os.getpriority(os.PRIO_PROCESS, 0))
    if ionice == "none":
        return
    io_class = psutil.IOPRIO_CLASS_IDLE if ionice == "idle" else psutil.IOPRIO_CLASS_BE
    try:
        psutil.Process().ionice(io_class, value=7 if io_class == psutil.IOPRIO_CLASS_BE else None)
    except (OSError, psutil.Error) as exc:
        logger.debug("Cannot set the I/O class %s: %s", ionice, exc)
