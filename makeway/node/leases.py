"""Lease renewal on a thread and a store connection of its own.

The supervisor's loop writes to the store on every claim, result and
suspension, and a job's `ctx.transaction()` may hold SQLite's only write lock
for up to `jobs.transaction_max_s`. Renewing leases from that loop would put
every renewal behind whatever the loop is waiting for. A thread with its own
connection renews on time as long as the store accepts a write, and the
attempt fence in the UPDATE keeps a renewal from reviving a job that another
attempt owns.

When renewals keep failing (the store is locked or unreachable), a lease
runs out while its job still runs, and another node may claim the job. The
renewer therefore stops such a job itself shortly before its lease ends, so
the old attempt is gone before a new one can start, and the attempt fence
rejects anything it wrote late.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Sequence

from makeway.store import open_store

logger = logging.getLogger(__name__)

# A held lease: (job id, attempt, monotonic time of its claim).
HeldLease = tuple[str, int, float]


class LeaseRenewer:
    """Every `interval_s`, extend the leases returned by `held()` to now + `lease_s`.

    Leases the store no longer grants (another attempt owns the job, or it
    ended) are collected for the supervisor's loop, which does the
    bookkeeping: `take_lost()` returns them, and `on_lost` is called to wake
    the loop. Leases about to run out without a renewal are passed to
    `on_expiring` on this thread first, which must stop their jobs at once.
    """

    def __init__(self, store_url: str, lease_s: float, interval_s: float,
                 held: Callable[[], Sequence[HeldLease]], on_lost: Callable[[], None] | None = None,
                 on_expiring: Callable[[list[tuple[str, int]]], None] | None = None):
        # A renewal waits for the write lock at most one interval, so the
        # expiry check below still runs while another writer holds the store.
        self._store = open_store(store_url, create=False, busy_timeout_s=interval_s)
        self._lease_s = lease_s
        self._interval_s = interval_s
        # Stop a job this long before its lease ends, for the kill to land and
        # for clocks that differ a little between nodes.
        self.margin_s = min(1.0, lease_s / 10)
        self._held = held
        self._on_lost = on_lost
        self._on_expiring = on_expiring
        self._valid_until: dict[tuple[str, int], float] = {}
        self._lost: deque[tuple[str, int]] = deque()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="makeway-lease-renewal", daemon=True)
        self.renewals = 0
        self.failures = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(self._interval_s + 5.0)
        self._store.close()

    def take_lost(self) -> list[tuple[str, int]]:
        """Return and forget the leases found lost or stopped since the last call."""
        lost = []
        while self._lost:
            lost.append(self._lost.popleft())
        return lost

    def renew(self, held: Sequence[HeldLease] | None = None) -> list[tuple[str, int]]:
        """Renew once now; return the leases that were lost."""
        held = list(self._held()) if held is None else held
        sent = time.monotonic()
        pairs = [(job_id, attempt) for job_id, attempt, _ in held]
        lost = self._store.renew_leases(pairs, time.time() + self._lease_s)
        for pair in pairs:
            self._valid_until[pair] = sent + self._lease_s
        self.renewals += 1
        return lost

    def expiring(self, held: Sequence[HeldLease], now: float) -> list[tuple[str, int]]:
        """Return the held leases that end within the margin, counted from their last renewal or their claim."""
        current = {(job_id, attempt) for job_id, attempt, _ in held}
        for pair in [pair for pair in self._valid_until if pair not in current]:
            del self._valid_until[pair]
        due = []
        for job_id, attempt, claimed_at in held:
            until = max(self._valid_until.get((job_id, attempt), 0.0), claimed_at + self._lease_s)
            if now >= until - self.margin_s:
                due.append((job_id, attempt))
        return due

    def _run(self) -> None:
        # Renewals keep a fixed cadence: time spent waiting for the write lock
        # does not push the next renewal later.
        next_at = time.monotonic() + self._interval_s
        while not self._stopped.wait(max(0.0, next_at - time.monotonic())):
            next_at = max(next_at + self._interval_s, time.monotonic())
            held = list(self._held())
            try:
                lost = self.renew(held)
            except Exception as exc:  # noqa: BLE001 - one failed renewal must not end renewal for good
                self.failures += 1
                logger.warning("Renewing %d lease(s) failed: %s; retrying in %.1f s", len(held), exc, self._interval_s)
                lost = []
            expiring = [pair for pair in self.expiring(held, time.monotonic()) if pair not in lost]
            if expiring:
                logger.error("Stopping %d job(s) whose lease ends in under %.1f s without a renewal, so that no "
                             "other node runs them at the same time: %s", len(expiring), self.margin_s,
                             ", ".join(f"job={job_id} attempt={attempt}" for job_id, attempt in expiring))
                # Recorded before the kill, so the loop never reads the dead
                # worker as a job failure.
                self._lost.extend(expiring)
                if self._on_expiring is not None:
                    self._on_expiring(expiring)
            if lost:
                self._lost.extend(lost)
            if (lost or expiring) and self._on_lost is not None:
                self._on_lost()
