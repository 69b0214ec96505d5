"""Suspend preemption: which background jobs to stop while interactive work runs.

The supervisor calls `plan_suspensions` whenever demand may have changed. It
returns the full set of jobs that should be suspended at `now`, and the node
sends signals only for the differences from what is suspended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence

from makeway.policy import PolicyConfig, TierConfig


@dataclass(frozen=True)
class RunningJob:
    """A background job occupying a worker: the fields the planner ranks by."""

    key: Hashable
    tier: str
    priority: int
    started_at: float


@dataclass
class TierShare:
    """Min-share bookkeeping of one tier."""

    # Start of the current stretch in which the tier's jobs were kept suspended.
    suspended_since: float | None = None
    # While now < burst_until the tier runs despite interactive demand.
    burst_until: float | None = None


@dataclass
class PreemptionState:
    """Planner state kept between calls."""

    last_demand_at: float | None = None
    last_demand: int = 0
    # First time the planner saw zero demand after some; the hold counts from here.
    drained_at: float | None = None
    shares: dict[str, TierShare] = field(default_factory=dict)


@dataclass(frozen=True)
class SuspensionPlan:
    suspend: frozenset
    # When the plan may change without new input (a hold or burst ends); None if never.
    next_check_at: float | None


def plan_suspensions(
    policy: PolicyConfig,
    tiers: Mapping[str, TierConfig],
    slots: int,
    interactive_demand: int,
    background: Sequence[RunningJob],
    state: PreemptionState,
    now: float,
) -> SuspensionPlan:
    """Return the background jobs to keep suspended at `now`, updating `state`.

    `interactive_demand` counts interactive jobs running or queued on this node.
    Suspension lasts while there is demand and for `policy.suspend_hold_s`
    after the first call with zero demand, so a burst of arrivals does not
    make workers thrash. The caller must call again as soon as demand drains.
    """
    if policy.suspend == "off" or policy.scheduling == "fifo":
        return SuspensionPlan(frozenset(), None)

    if interactive_demand > 0:
        state.last_demand_at = now
        state.last_demand = interactive_demand
        state.drained_at = None
    elif state.last_demand_at is not None and state.drained_at is None:
        state.drained_at = now
    hold_ends_at = None if state.drained_at is None else state.drained_at + policy.suspend_hold_s
    active = interactive_demand > 0 or (hold_ends_at is not None and now < hold_ends_at)
    if not active:
        state.shares.clear()
        return SuspensionPlan(frozenset(), None)

    preemptible = [
        job for job in background
        if job.tier in tiers and tiers[job.tier].preemptible and "suspend" in tiers[job.tier].preemption
    ]
    victims = _choose_victims(policy, tiers, slots, state.last_demand, preemptible)
    victims, share_check_at = _apply_min_share(policy, tiers, victims, state, now)

    checks = [at for at in (share_check_at, None if interactive_demand > 0 else hold_ends_at) if at is not None]
    return SuspensionPlan(frozenset(job.key for job in victims), min(checks) if checks else None)


def _choose_victims(
    policy: PolicyConfig, tiers: Mapping[str, TierConfig], slots: int, demand: int, jobs: Sequence[RunningJob]
) -> list[RunningJob]:
    if policy.suspend == "all":
        return list(jobs)

    # as-needed: keep running only as many background jobs as slots remain
    # after interactive demand, preferring higher tiers, higher priorities and
    # jobs that started earlier (they have more work to lose).
    free_slots = max(0, slots - min(demand, slots))
    order = sorted(jobs, key=lambda job: (tiers[job.tier].rank, -job.priority, job.started_at))
    return order[free_slots:]


def _apply_min_share(
    policy: PolicyConfig,
    tiers: Mapping[str, TierConfig],
    victims: list[RunningJob],
    state: PreemptionState,
    now: float,
) -> tuple[list[RunningJob], float | None]:
    """Exempt tiers that are owed their min_share of the current period.

    A tier kept suspended for (1 - min_share) of a period runs for a burst of
    min_share of a period, then may be suspended again.
    """
    period_s = policy.min_share_period_s
    victim_tiers = {job.tier for job in victims}
    for tier_name in list(state.shares):
        if tier_name not in victim_tiers:
            del state.shares[tier_name]

    exempt: set[str] = set()
    next_check: list[float] = []
    for tier_name in victim_tiers:
        min_share = tiers[tier_name].min_share
        share = state.shares.setdefault(tier_name, TierShare())
        if share.burst_until is not None:
            if now < share.burst_until:
                exempt.add(tier_name)
                next_check.append(share.burst_until)
                continue
            share.suspended_since = share.burst_until
            share.burst_until = None
        if share.suspended_since is None:
            share.suspended_since = now
        if min_share <= 0:
            continue
        burst_due_at = share.suspended_since + (1 - min_share) * period_s
        if now >= burst_due_at:
            share.burst_until = now + min_share * period_s
            exempt.add(tier_name)
            next_check.append(share.burst_until)
        else:
            next_check.append(burst_due_at)

    remaining = [job for job in victims if job.tier not in exempt]
    return remaining, (min(next_check) if next_check else None)
