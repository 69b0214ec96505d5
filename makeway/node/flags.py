"""Per-worker flags in shared memory between a worker and its supervisor.

The job writes the critical-section depth; the supervisor writes the
suspend-pending, yield and cancellation requests. Reading a flag is one
index into shared memory: no system call and no store access.

The supervisor creates each array before it starts the worker and passes it
to the child at spawn, so no named segment exists that a killed worker could
leave behind or that the resource tracker could unlink early.
"""

from __future__ import annotations

import multiprocessing
from typing import Callable

CRITICAL_DEPTH = 0
# Set by the supervisor when it wanted to suspend the worker but found it
# inside a critical section; the worker then reports the section's end.
SUSPEND_PENDING = 1
# Set by the supervisor to ask the running job to give up its slot at its next
# yield point, and to tell it that it has been cancelled.
YIELD_REQUESTED = 2
CANCEL_REQUESTED = 3
_SIZE = 4


def new_flag_array():
    return multiprocessing.get_context("spawn").RawArray("i", _SIZE)


class WorkerFlags:
    """A view of one worker's flag array."""

    def __init__(self, array, on_critical_exit: Callable[[], None] | None = None):
        self._array = array
        self._on_critical_exit = on_critical_exit

    def enter_critical(self) -> None:
        self._array[CRITICAL_DEPTH] += 1

    def exit_critical(self) -> None:
        # Report the end while still inside the section: the supervisor never
        # stops a worker mid-section, so the report cannot be cut off halfway.
        if self._array[CRITICAL_DEPTH] == 1 and self._array[SUSPEND_PENDING] and self._on_critical_exit:
            self._on_critical_exit()
        self._array[CRITICAL_DEPTH] -= 1

    @property
    def in_critical(self) -> bool:
        return self._array[CRITICAL_DEPTH] > 0

    def set_suspend_pending(self, pending: bool) -> None:
        self._array[SUSPEND_PENDING] = 1 if pending else 0

    def request_yield(self) -> None:
        self._array[YIELD_REQUESTED] = 1

    def request_cancel(self) -> None:
        self._array[CANCEL_REQUESTED] = 1

    @property
    def yield_requested(self) -> bool:
        return self._array[YIELD_REQUESTED] != 0

    @property
    def cancel_requested(self) -> bool:
        return self._array[CANCEL_REQUESTED] != 0

    @property
    def array(self):
        return self._array

    def reset(self) -> None:
        for index in range(_SIZE):
            self._array[index] = 0
