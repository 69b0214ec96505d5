"""Worker process main: run one job at a time for the supervisor.

Data flow over the worker's duplex pipe:

    supervisor -> worker   ("run", Assignment fields) | ("stop",) | ("checkpoint_ack", seq, applied)
    worker -> supervisor   ("ready", pid) | ("done", job_id, attempt, kind, result, error, traceback)
                           | ("critical_exit",) | ("checkpoint", job_id, attempt, seq, state, progress)
                           | ("progress", job_id, attempt, done, total, message)
                           | ("checkpointed", job_id, attempt)

The worker never touches the store: a worker can be stopped with SIGSTOP at
any moment, and a stopped process must not hold a store lock, so checkpoints
and progress go through the supervisor. While a job runs, the worker sends
each message inside a critical section, so the supervisor never stops it
halfway through a send. An idle worker is never suspended.

SIGTERM raises CancellationRequested in the job's main thread, which ends a
sleep or a blocking read at once; outside job code the worker ignores it.
Pipe traffic runs with SIGTERM blocked, so the exception can never cut a
message in half.
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
# The job ended on a JobInterrupt: it yielded, was stopped, or lost its lease.
YIELDED = "yielded"
INTERRUPTED = "interrupted"
STALE = "stale"

_TERM = {signal.SIGTERM}


class _JobState:
    """Whether job code runs now, so that SIGTERM may interrupt it."""

    interruptible = False


def _on_sigterm(signum, frame) -> None:
    if _JobState.interruptible:
        from makeway.errors import CancellationRequested

        raise CancellationRequested("the supervisor stopped this job with SIGTERM")


async def _run_stoppable(coroutine):
    """Await a job's coroutine; SIGTERM cancels its task.

    asyncio swallows exceptions that a signal handler raises inside a loop
    callback, so a coroutine job is stopped through task cancellation instead.
    """
    from makeway.errors import CancellationRequested

    task = asyncio.ensure_future(coroutine)
    stopped = False

    def stop() -> None:
        nonlocal stopped
        stopped = True
        task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)
    try:
        return await task
    except asyncio.CancelledError:
        if stopped:
            raise CancellationRequested("the supervisor stopped this job with SIGTERM") from None
        raise


class Channel:
    """The job's side of checkpoint and progress traffic with the supervisor."""

    def __init__(self, conn, flags, job_id: str, attempt: int):
        self._conn = conn
        self._flags = flags
        self._job_id = job_id
        self._attempt = attempt
        self._sequence = 0

    def _send(self, message: tuple) -> None:
        self._flags.enter_critical()
        try:
            self._conn.send(message)
        finally:
            self._flags.exit_critical()

    def checkpoint(self, state: str, progress) -> bool:
        """Send a checkpoint and wait for the supervisor's reply: True if stored, False if the attempt is stale."""
        self._sequence += 1
        signal.pthread_sigmask(signal.SIG_BLOCK, _TERM)
        try:
            self._send(("checkpoint", self._job_id, self._attempt, self._sequence, state, progress))
            while True:
                message = self._conn.recv()
                if message[0] == "checkpoint_ack" and message[1] == self._sequence:
                    return bool(message[2])
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _TERM)

    def checkpointed(self) -> None:
        """Tell the supervisor that the job committed a checkpoint in its own transaction."""
        signal.pthread_sigmask(signal.SIG_BLOCK, _TERM)
        try:
            self._send(("checkpointed", self._job_id, self._attempt))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _TERM)

    def progress(self, done: float, total, message) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _TERM)
        try:
            self._send(("progress", self._job_id, self._attempt, done, total, message))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _TERM)


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its supervisor dies.

    A worker of a supervisor that was SIGKILLed would otherwise run on, or
    stay stopped forever if it was suspended; SIGKILL ends a stopped process
    too. Uses Linux's PR_SET_PDEATHSIG; elsewhere the worker notices only when
    its pipe closes.
    """
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError) as exc:
        logging.getLogger(__name__).warning("Cannot ask to die with the supervisor: %s", exc)
    # The supervisor may have died before the request took effect.
    if os.getppid() != parent or parent == 1:
        os._exit(1)


PR_SET_PDEATHSIG = 1


def worker_main(app_spec: str, conn, flag_array, nice: int | None, ionice: str, cpu_policy: str, log_level: int,
                sys_path: list[str], store_url: str | None = None) -> None:
    # A process group of its own lets the supervisor stop, resume and kill the
    # job together with any child processes the job starts. It also keeps a
    # terminal's Ctrl-C away from workers, so the supervisor decides shutdown.
    os.setpgid(0, 0)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [worker %(process)d] %(name)s: %(message)s")
    sys.path[:0] = [entry for entry in sys_path if entry not in sys.path]
    from makeway.node.priority import set_worker_priority

    set_worker_priority(nice, ionice, cpu_policy)

    from makeway.app import load_app
    from makeway.node.flags import WorkerFlags

    app = load_app(app_spec)
    if store_url is not None and store_url != app.store_url:
        # The node's --store wins over the app module's store; job
        # transactions must open the same store.
        app.use_store(store_url)
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
        if message[0] != "run":
            # A reply to a checkpoint whose job was interrupted while waiting for it.
            continue
        outcome = run_job(app, message[1:], flags, conn)
        if outcome[2] not in (OK, ERROR, INVALID):
            # The job was stopped: end whatever it started in the process group
            # before this worker takes the next job.
            from makeway.node.process import kill_escaped_children, kill_group_members

            log = logging.getLogger(__name__)
            for pid, command in kill_escaped_children(os.getpid()):
                log.warning("Job %s left pid=%d (%s) outside its process group, where stop signals do not reach; "
                            "killed it", outcome[0], pid, command)
            killed = kill_group_members(os.getpid())
            if killed:
                log.info("Killed %d leftover process(es) of job %s", killed, outcome[0])
        flags.enter_critical()
        try:
            send(("done", *outcome))
        finally:
            flags.exit_critical()


def run_job(app, fields: tuple, flags, conn=None) -> tuple[str, int, str, Any, str | None, str | None]:
    """Run one job; return (job_id, attempt, kind, encoded result, error, traceback)."""
    import json

    from makeway.errors import JobInterrupt, StaleAttempt, YieldRequested
    from makeway.jobs import JobContext
    from makeway.observe.tracing import ATTEMPT_CONTEXT_KEY, attempt_context
    from makeway.serialization import decode, encode

    job_id, attempt, name, payload, serializer, tier, metadata, checkpoint = fields
    try:
        function = app.function(name)
        call = decode(payload, serializer, allow_pickle=app.allows_pickle)
        args, kwargs = call["args"], call["kwargs"]
    except Exception as exc:
        return job_id, attempt, INVALID, None, f"invalid payload: {exc}", None

    trace_carrier = metadata.pop(ATTEMPT_CONTEXT_KEY, None)
    if function.takes_context:
        channel = Channel(conn, flags, job_id, attempt) if conn is not None else None
        resume_state = json.loads(checkpoint) if checkpoint is not None else None
        kwargs = {**kwargs, "ctx": JobContext(
            job_id=job_id, name=name, tier=tier, attempt=attempt, metadata=metadata, flags=flags, channel=channel,
            resume_state=resume_state, state_limit_bytes=app.settings.jobs.payload_limit_bytes,
            store_path=app.store_path, transaction_max_s=app.settings.jobs.transaction_max_s,
            encode_result=lambda value: encode(value, serializer, what=f"result of {name}",
                                               limit_bytes=app.settings.jobs.payload_limit_bytes),
        )}
    _JobState.interruptible = True
    try:
        with attempt_context({ATTEMPT_CONTEXT_KEY: trace_carrier}):
            result = function.fn(*args, **kwargs)
            if function.is_async:
                try:
                    result = asyncio.run(_run_stoppable(result))
                finally:
                    # Closing the loop resets the signals it handled to their defaults.
                    signal.signal(signal.SIGTERM, _on_sigterm)
        _JobState.interruptible = False
    except JobInterrupt as exc:
        _JobState.interruptible = False
        if isinstance(exc, YieldRequested):
            kind = YIELDED
        elif isinstance(exc, StaleAttempt):
            kind = STALE
        else:
            kind = INTERRUPTED
        return job_id, attempt, kind, None, f"{type(exc).__name__}: {exc}", None
    except Exception as exc:
        _JobState.interruptible = False
        return job_id, attempt, ERROR, None, f"{type(exc).__name__}: {exc}", traceback.format_exc()
    finally:
        _JobState.interruptible = False

    try:
        data = encode(result, serializer, what=f"result of {name}", limit_bytes=app.settings.jobs.payload_limit_bytes)
    except Exception as exc:
        return job_id, attempt, INVALID, None, str(exc), None
    return job_id, attempt, OK, data, None, None
