"""Unit tests of the pure scheduling decisions, driven with explicit times."""

from __future__ import annotations

import random

import pytest

from makeway.policy import DEFAULT_TIERS, PolicyConfig, TierConfig
from makeway.scheduler.dispatch import effective_priority, rank_candidates, rank_fifo
from makeway.scheduler.preemption import PreemptionState, RunningJob, plan_suspensions
from makeway.scheduler.retry import minimum_retry_delay_s, retry_delay_s
from makeway.scheduler.slicing import MAX_WAIT, TIME_SLICE, SlotHolder, plan_handoffs
from makeway.store import Candidate

TIERS = dict(DEFAULT_TIERS)


def candidate(job_id, tier="bulk", priority=0, submitted_at=0.0, queued_at=None, waited_s=0.0):
    return Candidate(
        id=job_id,
        name="tests.jobs:work",
        tier=tier,
        tier_rank=TIERS[tier].rank if tier in TIERS else 99,
        priority=priority,
        submitted_at=submitted_at,
        queued_at=submitted_at if queued_at is None else queued_at,
        waited_s=waited_s,
    )


def ranked_ids(candidates, now, tiers=TIERS):
    return [item.id for item in rank_candidates(candidates, tiers, now)]


# -- effective_priority ---------------------------------------------------


def test_effective_priority_adds_aging():
    tier = TierConfig(rank=30, aging_per_s=0.1)

    assert effective_priority(candidate("a", priority=3, submitted_at=100.0), tier, 150.0) == pytest.approx(8.0)


def test_effective_priority_no_credit_before_submit():
    tier = TierConfig(rank=30, aging_per_s=0.1)

    assert effective_priority(candidate("a", priority=3, submitted_at=100.0), tier, 90.0) == 3


def test_effective_priority_zero_aging():
    tier = TierConfig(rank=30, aging_per_s=0.0)

    assert effective_priority(candidate("a", priority=-4, submitted_at=0.0), tier, 1e6) == -4


# -- rank_candidates ------------------------------------------------------


def test_rank_tier_before_priority():
    jobs = [
        candidate("bulk-high", "bulk", priority=100, submitted_at=0.0),
        candidate("essential-low", "essential", priority=-100, submitted_at=5.0),
    ]

    assert ranked_ids(jobs, now=10.0) == ["essential-low", "bulk-high"]


def test_rank_priority_within_tier():
    jobs = [
        candidate("low", priority=1, submitted_at=10.0),
        candidate("high", priority=5, submitted_at=10.0),
    ]

    assert ranked_ids(jobs, now=10.0) == ["high", "low"]


def test_rank_submission_time_breaks_ties():
    jobs = [
        candidate("later", priority=1, submitted_at=20.0),
        candidate("earlier", priority=1, submitted_at=10.0),
    ]

    # With aging on, the earlier job also has the higher effective priority,
    # so aging is off here to test the tie-break alone.
    no_aging = {"bulk": TierConfig(rank=30, aging_per_s=0.0)}
    assert ranked_ids(jobs, now=20.0, tiers=no_aging) == ["earlier", "later"]


def test_rank_aging_not_yet_enough():
    # Bulk jobs gain 0.1 points per second, so after 10 s the old job has 1 point.
    jobs = [
        candidate("old-low", priority=0, submitted_at=1000.0),
        candidate("new-high", priority=5, submitted_at=1010.0),
    ]

    assert ranked_ids(jobs, now=1010.0) == ["new-high", "old-low"]


def test_rank_aging_overtakes():
    # After 100 s the old job has 10 points, more than a fresh priority 5.
    jobs = [
        candidate("old-low", priority=0, submitted_at=1000.0),
        candidate("new-high", priority=5, submitted_at=1100.0),
    ]

    assert ranked_ids(jobs, now=1100.0) == ["old-low", "new-high"]


def test_rank_aging_stays_inside_tier():
    jobs = [
        candidate("old-bulk", "bulk", priority=0, submitted_at=0.0),
        candidate("new-essential", "essential", priority=0, submitted_at=3000.0),
    ]

    # 3000 s of aging is 300 points, but bulk is not overdue before 3600 s.
    assert ranked_ids(jobs, now=3000.0) == ["new-essential", "old-bulk"]


def test_rank_overdue_first_across_tiers():
    jobs = [
        candidate("fresh-interactive", "interactive", priority=0, submitted_at=3600.0),
        candidate("overdue-bulk", "bulk", priority=-50, submitted_at=0.0),
    ]

    assert ranked_ids(jobs, now=3600.0) == ["overdue-bulk", "fresh-interactive"]


def test_rank_overdue_oldest_first():
    jobs = [
        candidate("overdue-essential", "essential", submitted_at=100.0),
        candidate("overdue-bulk", "bulk", submitted_at=0.0),
        candidate("fresh-essential", "essential", submitted_at=3700.0),
    ]

    assert ranked_ids(jobs, now=3700.0) == ["overdue-bulk", "overdue-essential", "fresh-essential"]


def test_rank_just_below_max_wait_not_overdue():
    jobs = [
        candidate("interactive", "interactive", submitted_at=100.0),
        candidate("bulk", "bulk", submitted_at=0.0),
    ]

    assert ranked_ids(jobs, now=3599.0) == ["interactive", "bulk"]


def test_rank_unknown_tier_dropped():
    jobs = [candidate("known", "bulk"), candidate("unknown", "nightly")]

    assert ranked_ids(jobs, now=1.0) == ["known"]


def test_rank_empty():
    assert rank_candidates([], TIERS, 1.0) == []


# -- rank_fifo ------------------------------------------------------------


def test_rank_fifo_ignores_tier_and_priority():
    jobs = [
        candidate("interactive-high", "interactive", priority=100, submitted_at=3.0),
        candidate("bulk-low", "bulk", priority=-100, submitted_at=1.0),
        candidate("essential", "essential", priority=0, submitted_at=2.0),
    ]

    assert [item.id for item in rank_fifo(jobs)] == ["bulk-low", "essential", "interactive-high"]


# -- plan_suspensions -----------------------------------------------------


def running(key, tier="bulk", priority=0, started_at=0.0):
    return RunningJob(key=key, tier=tier, priority=priority, started_at=started_at)


def plan(policy, background, demand, now, state=None, slots=2, tiers=TIERS):
    state = PreemptionState() if state is None else state
    return plan_suspensions(policy, tiers, slots, demand, background, state, now)


BACKGROUND = [
    running("essential-1", "essential"),
    running("opportunistic-1", "opportunistic"),
    running("bulk-1", "bulk"),
    running("bulk-2", "bulk", priority=9),
]


def test_plan_all_suspends_every_background_job():
    result = plan(PolicyConfig(suspend="all"), BACKGROUND, demand=1, now=10.0)

    assert result.suspend == {"essential-1", "opportunistic-1", "bulk-1", "bulk-2"}


def test_plan_no_demand_suspends_none():
    result = plan(PolicyConfig(suspend="all"), BACKGROUND, demand=0, now=10.0)

    assert result.suspend == frozenset()
    assert result.next_check_at is None


def test_plan_off_suspends_none():
    result = plan(PolicyConfig(suspend="off"), BACKGROUND, demand=3, now=10.0)

    assert result.suspend == frozenset()


def test_plan_fifo_suspends_none():
    result = plan(PolicyConfig(scheduling="fifo", suspend="all"), BACKGROUND, demand=3, now=10.0)

    assert result.suspend == frozenset()


def test_plan_non_preemptible_never_suspended():
    tiers = {**TIERS, "pinned": TierConfig(rank=15, preemptible=False)}
    background = [running("pinned-1", "pinned"), running("bulk-1", "bulk")]

    all_result = plan(PolicyConfig(suspend="all"), background, demand=1, now=10.0, tiers=tiers)
    as_needed_result = plan(PolicyConfig(suspend="as-needed"), background, demand=2, now=10.0, slots=2, tiers=tiers)

    assert all_result.suspend == {"bulk-1"}
    assert as_needed_result.suspend == {"bulk-1"}


def test_plan_unknown_tier_never_suspended():
    background = [running("nightly-1", "nightly"), running("bulk-1", "bulk")]

    result = plan(PolicyConfig(suspend="all"), background, demand=1, now=10.0)

    assert result.suspend == {"bulk-1"}


def test_plan_as_needed_lowest_tier():
    background = [running("essential-1", "essential"), running("bulk-1", "bulk")]

    result = plan(PolicyConfig(suspend="as-needed"), background, demand=1, now=10.0, slots=2)

    assert result.suspend == {"bulk-1"}


def test_plan_as_needed_lowest_priority():
    background = [running("low", "bulk", priority=1), running("high", "bulk", priority=2)]

    result = plan(PolicyConfig(suspend="as-needed"), background, demand=1, now=10.0, slots=2)

    assert result.suspend == {"low"}


def test_plan_as_needed_latest_started():
    background = [running("later", "bulk", started_at=5.0), running("earlier", "bulk", started_at=1.0)]

    result = plan(PolicyConfig(suspend="as-needed"), background, demand=1, now=10.0, slots=2)

    assert result.suspend == {"later"}


def test_plan_as_needed_free_slot_suspends_none():
    background = [running("bulk-1", "bulk")]

    result = plan(PolicyConfig(suspend="as-needed"), background, demand=1, now=10.0, slots=2)

    assert result.suspend == frozenset()


def test_plan_as_needed_demand_over_slots():
    background = [running("bulk-1", "bulk"), running("bulk-2", "bulk")]

    result = plan(PolicyConfig(suspend="as-needed"), background, demand=5, now=10.0, slots=2)

    assert result.suspend == {"bulk-1", "bulk-2"}


def test_plan_hold_keeps_suspended():
    policy = PolicyConfig(suspend="all", suspend_hold_s=0.5)
    state = PreemptionState()
    background = [running("bulk-1")]

    during_demand = plan(policy, background, demand=1, now=10.0, state=state)
    drained = plan(policy, background, demand=0, now=10.2, state=state)
    in_hold = plan(policy, background, demand=0, now=10.6, state=state)
    after_hold = plan(policy, background, demand=0, now=10.7, state=state)

    assert during_demand.suspend == {"bulk-1"}
    assert drained.suspend == {"bulk-1"}
    assert drained.next_check_at == pytest.approx(10.7)
    assert in_hold.suspend == {"bulk-1"}
    assert after_hold.suspend == frozenset()
    assert after_hold.next_check_at is None


def test_plan_hold_not_in_next_check_during_demand():
    policy = PolicyConfig(suspend="all", suspend_hold_s=0.5, min_share_period_s=100.0)
    background = [running("bulk-1")]

    result = plan(policy, background, demand=1, now=10.0)

    # Only the min_share burst (at 10 + 0.95 * 100) is a scheduled change.
    assert result.next_check_at == pytest.approx(105.0)


def test_plan_hold_restarts_on_new_demand():
    policy = PolicyConfig(suspend="all", suspend_hold_s=0.5, min_share_period_s=100.0)
    state = PreemptionState()
    background = [running("bulk-1")]

    plan(policy, background, demand=1, now=10.0, state=state)
    plan(policy, background, demand=1, now=10.4, state=state)
    result = plan(policy, background, demand=0, now=10.8, state=state)

    assert result.suspend == {"bulk-1"}
    assert result.next_check_at == pytest.approx(11.3)


def simulate_min_share(min_share, steps=1000, step_s=0.01):
    """Plan every step_s under continuous demand; return (time, suspended) pairs."""
    tiers = {"interactive": TIERS["interactive"], "bulk": TierConfig(rank=30, min_share=min_share)}
    policy = PolicyConfig(suspend="all", min_share_period_s=1.0)
    state = PreemptionState()
    background = [running("bulk-1")]
    timeline = []
    for step in range(steps):
        now = step * step_s
        result = plan_suspensions(policy, tiers, 2, 1, background, state, now)
        timeline.append((now, "bulk-1" in result.suspend))
    return timeline


def longest_suspension_s(timeline):
    longest, started = 0.0, None
    for now, suspended in timeline:
        if suspended and started is None:
            started = now
        elif not suspended and started is not None:
            longest = max(longest, now - started)
            started = None
    if started is not None:
        longest = max(longest, timeline[-1][0] - started)
    return longest


def test_min_share_runs_each_period():
    timeline = simulate_min_share(0.05)

    for period in range(10):
        steps = timeline[period * 100:(period + 1) * 100]
        running_steps = sum(1 for _, suspended in steps if not suspended)
        assert 4 <= running_steps <= 6, f"period {period}: ran {running_steps} of 100 steps"


def test_min_share_total_share():
    timeline = simulate_min_share(0.05)
    share = sum(1 for _, suspended in timeline if not suspended) / len(timeline)

    assert share == pytest.approx(0.05, abs=0.01)


def test_min_share_longest_suspension():
    timeline = simulate_min_share(0.05)

    assert longest_suspension_s(timeline) <= 0.95 + 1e-9


def test_min_share_next_check_at_burst():
    tiers = {"interactive": TIERS["interactive"], "bulk": TierConfig(rank=30, min_share=0.05)}
    policy = PolicyConfig(suspend="all", min_share_period_s=1.0)
    state = PreemptionState()

    first = plan_suspensions(policy, tiers, 2, 1, [running("bulk-1")], state, 20.0)
    burst = plan_suspensions(policy, tiers, 2, 1, [running("bulk-1")], state, 20.95)

    assert first.next_check_at == pytest.approx(20.95)
    assert burst.suspend == frozenset()
    assert burst.next_check_at == pytest.approx(21.0)


def test_min_share_zero_never_bursts():
    timeline = simulate_min_share(0.0)

    assert all(suspended for _, suspended in timeline)


# -- retry_delay_s --------------------------------------------------------


def test_retry_delay_first_within_minimum_and_spread():
    delays = [retry_delay_s(1, 2.0, 300.0, 5.0, random.Random(seed)) for seed in range(200)]

    assert min(delays) >= 2.0
    assert max(delays) < 7.0
    assert max(delays) - min(delays) > 4.0


def test_retry_delay_minimum_and_spread_double():
    for failures in range(1, 8):
        current = retry_delay_s(failures, 1.0, 1e9, 3.0, random.Random(42))
        following = retry_delay_s(failures + 1, 1.0, 1e9, 3.0, random.Random(42))
        assert following == pytest.approx(2 * current), f"failures={failures}"


def test_retry_delay_capped():
    delays = [retry_delay_s(50, 1.0, 300.0, 30.0, random.Random(seed)) for seed in range(200)]

    assert min(delays) >= 300.0
    assert max(delays) < 600.0


def test_retry_delay_huge_failures_capped():
    assert retry_delay_s(10**6, 1.0, 300.0, 30.0, random.Random(1)) < 600.0


def test_retry_delay_without_jitter_is_the_minimum():
    assert retry_delay_s(4, 1.0, 300.0, 0.0, random.Random(3)) == minimum_retry_delay_s(4, 1.0, 300.0) == 8.0


def test_retry_delay_seeded_repeatable():
    first = [retry_delay_s(3, 1.0, 300.0, 30.0, random.Random(5)) for _ in range(3)]

    assert len(set(first)) == 1


def test_retry_delay_zero_failures_like_first():
    assert retry_delay_s(0, 1.0, 300.0, 30.0, random.Random(3)) == retry_delay_s(1, 1.0, 300.0, 30.0, random.Random(3))


def test_retry_delay_zero_backoff_and_jitter():
    assert retry_delay_s(5, 0.0, 300.0, 0.0, random.Random(3)) == 0.0


# -- plan_handoffs (time slicing) -----------------------------------------


SLICE_TIERS = {
    **TIERS,
    "essential": TIERS["essential"].model_copy(update={"max_wait_s": 2.0, "quantum_s": 10.0}),
    "bulk": TIERS["bulk"].model_copy(update={"quantum_s": 10.0}),
}


def test_handoff_none_while_quantum_runs_and_nobody_overdue():
    holders = [SlotHolder("w1", "bulk", 0, slice_started_at=100.0)]
    waiting = [candidate("b2", "bulk", submitted_at=1000.0)]

    assert plan_handoffs(SLICE_TIERS, holders, waiting, 0, wall_now=1001.0, now=105.0) == []


def test_handoff_rotates_same_tier_after_quantum():
    holders = [SlotHolder("w1", "bulk", 0, slice_started_at=100.0)]
    waiting = [candidate("b2", "bulk", submitted_at=1000.0)]

    handoffs = plan_handoffs(SLICE_TIERS, holders, waiting, 0, wall_now=1011.0, now=111.0)

    assert [(h.victim, h.beneficiary, h.reason) for h in handoffs] == [("w1", "b2", TIME_SLICE)]


def test_handoff_not_to_lower_priority_of_same_tier():
    holders = [SlotHolder("w1", "bulk", 5, slice_started_at=100.0)]
    waiting = [candidate("b2", "bulk", priority=0, submitted_at=1010.0)]

    assert plan_handoffs(SLICE_TIERS, holders, waiting, 0, wall_now=1011.0, now=200.0) == []


def test_handoff_higher_tier_overdue_takes_slot_before_quantum():
    holders = [SlotHolder("w1", "bulk", 0, slice_started_at=100.0)]
    waiting = [candidate("e1", "essential", submitted_at=1000.0)]

    early = plan_handoffs(SLICE_TIERS, holders, waiting, 0, wall_now=1001.0, now=101.0)
    overdue = plan_handoffs(SLICE_TIERS, holders, waiting, 0, wall_now=1002.5, now=102.5)

    assert early == []
    assert [(h.victim, h.reason) for h in overdue] == [("w1", MAX_WAIT)]


def test_handoff_never_from_higher_tier_to_lower():
    holders = [SlotHolder("w1", "essential", 0, slice_started_at=0.0)]
    waiting = [candidate("b1", "bulk", submitted_at=0.0)]

    assert plan_handoffs(SLICE_TIERS, holders, waiting, 0, wall_now=99_999.0, now=99_999.0) == []


def test_handoff_skips_waiting_jobs_that_get_a_free_slot():
    holders = [SlotHolder("w1", "bulk", 0, slice_started_at=0.0)]
    waiting = [candidate("b2", "bulk", submitted_at=0.0)]

    assert plan_handoffs(SLICE_TIERS, holders, waiting, 1, wall_now=500.0, now=500.0) == []


def test_handoff_takes_lowest_tier_first_and_one_slot_per_job():
    holders = [
        SlotHolder("essential-1", "essential", 0, slice_started_at=0.0),
        SlotHolder("bulk-1", "bulk", 0, slice_started_at=0.0),
        SlotHolder("opportunistic-1", "opportunistic", 0, slice_started_at=0.0),
    ]
    waiting = [candidate("e1", "essential", submitted_at=0.0), candidate("e2", "essential", submitted_at=1.0)]

    handoffs = plan_handoffs(SLICE_TIERS, holders, waiting, 0, wall_now=100.0, now=100.0)

    assert [(h.victim, h.beneficiary) for h in handoffs] == [("bulk-1", "e1"), ("opportunistic-1", "e2")]


def test_handoff_ignores_tiers_without_yield_or_requeue():
    tiers = {**SLICE_TIERS, "bulk": SLICE_TIERS["bulk"].model_copy(update={"preemption": ("suspend",)})}
    holders = [SlotHolder("w1", "bulk", 0, slice_started_at=0.0)]
    waiting = [candidate("e1", "essential", submitted_at=0.0)]

    assert plan_handoffs(tiers, holders, waiting, 0, wall_now=100.0, now=100.0) == []


def test_requeued_job_ranks_behind_one_that_waited_longer():
    # b1 ran and yielded at t=100 after waiting 30 s before; b2 has waited since t=70.
    yielded = candidate("b1", "bulk", submitted_at=0.0, queued_at=100.0, waited_s=30.0)
    waiting = candidate("b2", "bulk", submitted_at=70.0, queued_at=70.0)

    assert ranked_ids([yielded, waiting], now=100.0) == ["b2", "b1"]
    # The yielded job keeps its earlier credit: it beats a job that arrived just now.
    newcomer = candidate("b3", "bulk", submitted_at=100.0)
    assert ranked_ids([newcomer, yielded], now=100.0) == ["b1", "b3"]


def test_tier_rejects_a_mode_listed_twice():
    with pytest.raises(ValueError, match="lists a mode twice"):
        TierConfig(rank=5, preemption=("yield", "yield"))


def test_handoff_same_tier_needs_a_checkpoint():
    # Two long bulk jobs without checkpoints would restart each other forever.
    holders = [SlotHolder("w1", "bulk", 0, slice_started_at=0.0, resumable=False)]
    waiting = [candidate("b2", "bulk", submitted_at=0.0)]

    assert plan_handoffs(SLICE_TIERS, holders, waiting, 0, wall_now=99_999.0, now=99_999.0) == []


def test_handoff_higher_tier_takes_slot_without_checkpoint():
    holders = [SlotHolder("w1", "bulk", 0, slice_started_at=0.0, resumable=False)]
    waiting = [candidate("e1", "essential", submitted_at=0.0)]

    handoffs = plan_handoffs(SLICE_TIERS, holders, waiting, 0, wall_now=100.0, now=100.0)

    assert [h.victim for h in handoffs] == ["w1"]
