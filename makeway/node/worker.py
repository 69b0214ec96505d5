"""Worker process main: run one job at a time for the supervisor.

Data flow over the worker's duplex pipe:

    supervisor -> worker   ("run", Assignment fields) | ("stop",)
    worker -> supervisor   ("ready", pid) | ("done", job_id, attempt, kind, result, error, traceback)
                           | ("critical_exit",)

The worker never touches the store: a worker can be stopped with SIGSTOP at
any moment, and a stopped process must not hold a store lock. While a job
runs, the worker sends each message inside a critical section, so the
supervisor never stops it halfway through a send. An idle worker is never
suspended.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import traceback
from typing import Any

OK = "ok"
ERROR = "error"
INVALID = "invalid"


def set_background_priority(nice: int, ionice: str, cpu_policy: str = "normal") -> None:
    """Lower this process's CPU and I/O priority; children inherit both.

    `cpu_policy` "idle" selects SCHED_IDLE: the kernel runs the process only
    when no normal process wants the core, and a waking normal process
    preempts it at once.
    """
    import psutil

    if cpu_policy == "idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    if nice:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    if ionice == "none":
        return
    io_class = psutil.IOPRIO_CLASS_IDLE if ionice == "idle" else psutil.IOPRIO_CLASS_BE
    try:
        psutil.Process().ionice(io_class, value=7 if io_class == psutil.IOPRIO_CLASS_BE else None)
    except (OSError, psutil.Error) as exc:
        logging.getLogger(__name__).debug("Cannot set the I/O class %s: %s", ionice, exc)


def worker_main(app_spec: str, conn, flag_array, nice: int, ionice: str, cpu_policy: str, log_level: int,
                sys_path: list[str]) -> None:
    # A process group of its own lets the supervisor stop, resume and kill the
    # job together with any child processes the job starts. It also keeps a
    # terminal's Ctrl-C away from workers, so the supervisor decides shutdown.
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [worker %(process)d] %(name)s: %(message)s")
    sys.path[:0] = [entry for entry in sys_path if entry not in sys.path]
    set_background_priority(nice, ionice, cpu_policy)

    from makeway.app import load_app
    from makeway.node.flags import WorkerFlags

    app = load_app(app_spec)
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        with send_lock:
            conn.send(message)

    flags = WorkerFlags(flag_array, on_critical_exit=lambda: send(("critical_exit",)))
    send(("ready", os.getpid()))

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        outcome = run_job(app, message[1:], flags)
        flags.enter_critical()
        try:
            send(("done", *outcome))
        finally:
            flags.exit_critical()


def run_job(app, fields: tuple, flags) -> tuple[str, int, str, Any, str | None, str | None]:
    """Run one job; return (job_id, attempt, kind, encoded result, error, traceback)."""
    from makeway.jobs import JobContext
    from makeway.serialization import decode, encode

    job_id, attempt, name, payload, serializer, tier, metadata = fields
    try:
        function = app.function(name)
        call = decode(payload, serializer, allow_pickle=app.allows_pickle)
        args, kwargs = call["args"], call["kwargs"]
    except Exception as exc:
        return job_id, attempt, INVALID, None, f"invalid payload: {exc}", None

    if function.takes_context:
        kwargs = {**kwargs, "ctx": JobContext(job_id=job_id, name=name, tier=tier, attempt=attempt, metadata=metadata, flags=flags)}
    try:
        result = function.fn(*args, **kwargs)
        if function.is_async:
            result = asyncio.run(result)
    except Exception as exc:
        return job_id, attempt, ERROR, None, f"{type(exc).__name__}: {exc}", traceback.format_exc()

    try:
        data = encode(result, serializer, what=f"result of {name}", limit_bytes=app.settings.jobs.payload_limit_bytes)
    except Exception as exc:
        return job_id, attempt, INVALID, None, str(exc), None
    return job_id, attempt, OK, data, None, None
