"""Time slicing: when a waiting background job takes the slot of a running one.

Suspension makes room for interactive work on the CPU, but a suspended job
still keeps its worker. When more background jobs are runnable than there are
background slots, a running job gives its slot back (by yielding, or by being
requeued) in two cases:

- its quantum is over and a job of the same tier with at least its
  priority, or of a higher tier, waits: jobs rotate;
- a job of its tier or a higher one has waited past its tier's max_wait_s:
  no job waits behind a long one for longer than that.

A lower tier never takes a higher tier's slot, and a job of the same tier
takes the slot only of a job that loses little by giving it up: one with a
checkpoint, or one that can be parked. Without that rule, two long jobs
without checkpoints would take turns restarting each other and neither
would finish. The functions here only decide; the
supervisor carries the decisions out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

from makeway.policy import TierConfig
from makeway.scheduler.dispatch import effective_priority, is_overdue
from makeway.store.base import Candidate

TIME_SLICE = "time_slice"
MAX_WAIT = "max_wait"


@dataclass(frozen=True)
class SlotHolder:
    """A running background job that could give its slot away."""

    key: Hashable
    tier: str
    priority: int
    # When this attempt started running (monotonic seconds).
    slice_started_at: float
    # True if giving up the slot loses little: the job has a checkpoint, or it
    # can be parked (suspended in its worker) instead.
    resumable: bool = True


@dataclass(frozen=True)
class Handoff:
    """Take the slot of `victim` for `beneficiary`."""

    victim: Hashable
    beneficiary: str
    reason: str
    # The beneficiary is of the victim's tier, not a higher one.
    same_tier: bool = False


def plan_handoffs(
    tiers: Mapping[str, TierConfig],
    holders: Sequence[SlotHolder],
    waiting: Sequence[Candidate],
    slots_free_soon: int,
    wall_now: float,
    now: float,
) -> list[Handoff]:
    """Return the slots to take back, at most one per waiting job.

    `waiting` is ranked best first. The first `slots_free_soon` of them will
    get an idle worker, or one that is already giving its slot back, so they
    need no handoff.
    """
    available = [
        holder for holder in holders
        if holder.tier in tiers and tiers[holder.tier].preemptible
        and any(mode in ("yield", "requeue") for mode in tiers[holder.tier].preemption)
    ]
    # Take from the lowest tier first, then the lowest priority, then the job
    # that has run longest in its current slice.
    available.sort(key=lambda h: (-tiers[h.tier].rank, h.priority, h.slice_started_at))
    handoffs: list[Handoff] = []
    for candidate in waiting[max(0, slots_free_soon):]:
        tier = tiers.get(candidate.tier)
        if tier is None or not available:
            continue
        overdue = is_overdue(candidate, tier, wall_now)
        priority = effective_priority(candidate, tier, wall_now)
        for holder in available:
            holder_tier = tiers[holder.tier]
            if holder_tier.rank < tier.rank or (holder_tier.rank == tier.rank and not holder.resumable):
                continue
            quantum_over = now - holder.slice_started_at >= holder_tier.quantum_s
            outranks = holder_tier.rank > tier.rank or priority >= holder.priority
            if overdue or (quantum_over and outranks):
                reason = MAX_WAIT if overdue and not quantum_over else TIME_SLICE
                handoffs.append(Handoff(holder.key, candidate.id, reason, holder_tier.rank == tier.rank))
                available.remove(holder)
                break
    return handoffs
