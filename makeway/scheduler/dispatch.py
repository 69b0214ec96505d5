"""Dispatch order: which queued job a free worker takes next."""

from __future__ import annotations

from typing import Mapping, Sequence

from makeway.policy import TierConfig
from makeway.store.base import Candidate


def effective_priority(candidate: Candidate, tier: TierConfig, now: float) -> float:
    """Return priority plus the aging credit earned by all the job's waiting so far.

    A job that yielded or was requeued keeps the credit of its earlier waits,
    and earns more from the time it entered the queue again.
    """
    waited_s = candidate.waited_s + max(0.0, now - candidate.queued_at)
    return candidate.priority + tier.aging_per_s * waited_s


def is_overdue(candidate: Candidate, tier: TierConfig, now: float) -> bool:
    """True once a job has waited its tier's max_wait_s since it last entered the queue."""
    return now - candidate.queued_at >= tier.max_wait_s


def rank_candidates(candidates: Sequence[Candidate], tiers: Mapping[str, TierConfig], now: float) -> list[Candidate]:
    """Order candidates for dispatch, best first.

    Overdue jobs come first, longest waiting first, whatever their tier. The
    rest go by tier rank, then effective priority (highest first), then the
    time they entered the queue,
    so aging reorders jobs inside a tier but never lifts a job above a
    higher tier. Waiting across tiers is bounded by max_wait_s.
    """

    def key(candidate: Candidate) -> tuple:
        tier = tiers[candidate.tier]
        if is_overdue(candidate, tier, now):
            return (0, candidate.queued_at, 0, 0.0)
        return (1, tier.rank, -effective_priority(candidate, tier, now), candidate.queued_at)

    known = [candidate for candidate in candidates if candidate.tier in tiers]
    return sorted(known, key=key)


def rank_fifo(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Order candidates first in, first out, ignoring tiers and priorities."""
    return sorted(candidates, key=lambda candidate: candidate.submitted_at)
