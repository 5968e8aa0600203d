"""Property tests: every generated schedule validates, and `simulate` matches the closed forms."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from tfpipe.schedules import (
    Action,
    Costs,
    Schedule,
    clock,
    dependencies,
    get,
    gpipe,
    interleaved,
    one_f_one_b,
    simulate,
    validate,
    zb_h1,
)

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)
stages = st.integers(min_value=1, max_value=8)
micro_batches = st.integers(min_value=1, max_value=16)
chunk_counts = st.integers(min_value=1, max_value=4)
backward_costs = st.sampled_from([0.5, 1.0, 2.0, 3.0])  # backward / forward
EQUAL = Costs(forward=1.0, backward=2.0)  # I = W = 1 by default


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@SETTINGS
@given(k=stages, m=micro_batches)
def test_gpipe_closed_forms(k: int, m: int):
    sim = simulate(validate(gpipe(k, m)), EQUAL)
    assert close(sim.step_time, 3 * (m + k - 1))
    assert close(sim.bubble_fraction, (k - 1) / (m + k - 1))
    assert sim.peak_in_flight == (m,) * k


@SETTINGS
@given(k=stages, m=micro_batches, transfer=st.sampled_from([0.0, 0.25, 1.5]))
def test_gpipe_step_time_with_transfer(k: int, m: int, transfer: float):
    sim = simulate(gpipe(k, m), Costs(1.0, 2.0, transfer=transfer))
    assert close(sim.step_time, 3 * m + (k - 1) * (3 + 2 * transfer))


@SETTINGS
@given(k=stages, m=micro_batches, backward=backward_costs)
def test_1f1b_closed_forms(k: int, m: int, backward: float):
    sim = simulate(validate(one_f_one_b(k, m)), Costs(1.0, backward))
    assert close(sim.step_time, (1.0 + backward) * (m + k - 1))
    assert close(sim.bubble_fraction, (k - 1) / (m + k - 1))
    assert sim.peak_in_flight == tuple(min(k - s, m) for s in range(k))
    assert max(sim.peak_in_flight) <= k


@SETTINGS
@given(d=stages, m=micro_batches, v=chunk_counts, backward=backward_costs)
def test_interleaved_closed_forms(d: int, m: int, v: int, backward: float):
    """Per-chunk costs 1/v and B/v: a rank's whole forward is 1 and backward B, as in 1F1B.

    Step time (1 + B) * (max(M, D) + (min(M, D) - 1) / v); for M >= D the bubble is
    (D-1)/(v M + D - 1), 1F1B's (D-1)/(M + D - 1) with the fill/drain cut by v.
    """
    schedule = validate(get("interleaved", d * v, m, chunks=v))
    assert (schedule.num_ranks, schedule.num_stages) == (d, d * v)
    sim = simulate(schedule, Costs(forward=1.0 / v, backward=backward / v))
    assert close(sim.step_time, (1.0 + backward) * (max(m, d) + (min(m, d) - 1) / v))
    if m >= d:
        assert close(sim.bubble_fraction, (d - 1) / (v * m + d - 1))
    one = simulate(one_f_one_b(d, m), Costs(1.0, backward))
    assert sim.bubble_fraction <= one.bubble_fraction + 1e-12
    # Rank r holds at most its warm-up + 1 chunk activations (1F1B's d - r when v = 1).
    largest_group = m if m < 2 * d else d + m % d
    for r, actions in enumerate(schedule.ranks):
        live = peak = 0
        for a in actions:
            live += 1 if a.kind == "F" else -1
            peak = max(peak, live)
        if v == 1:
            assert peak == min(d - r, m)
        else:
            assert peak == min(2 * (d - r - 1) + (v - 1) * largest_group + 1, v * m)


def test_interleaved_exact_bubble_for_two_ranks_two_chunks():
    sim = simulate(interleaved(2, 4, chunks=2), Costs(forward=0.5, backward=1.0))
    assert close(sim.step_time, 13.5)  # 3 * (4 + 1/2)
    assert close(sim.bubble_fraction, 1 / 9)  # (D-1)/(vM+D-1) = 1/(8+1), 1F1B: 1/5


@SETTINGS
@given(k=stages, m=micro_batches)
def test_zb_h1_closed_forms(k: int, m: int):
    """F = I = W = 1: step max(3M + K - 1, 2M + 2K - 1), a third of 1F1B's bubble as M grows."""
    sim = simulate(validate(zb_h1(k, m)), EQUAL)
    one = simulate(one_f_one_b(k, m), EQUAL)
    assert close(sim.step_time, max(3 * m + k - 1, 2 * m + 2 * k - 1))
    if m >= k:
        assert close(sim.bubble_fraction, (k - 1) / (3 * m + k - 1))
        if k > 1:
            # (M+K-1)/(3M+K-1): 1/2 at M = K, falling to 1/3 as M grows.
            ratio = sim.bubble_fraction / one.bubble_fraction
            assert 1 / 3 < ratio <= 0.5 + 1e-12
            assert close(ratio, (m + k - 1) / (3 * m + k - 1))
    assert sim.bubble_fraction <= one.bubble_fraction + 1e-12
    assert sim.peak_in_flight == (min(k, m),) * k
    assert max(sim.peak_in_flight) <= max(one.peak_in_flight)


def test_zb_h1_bubble_is_about_a_third_for_many_micro_batches():
    zb = simulate(zb_h1(4, 64), EQUAL).bubble_fraction
    one = simulate(one_f_one_b(4, 64), EQUAL).bubble_fraction
    assert 0.33 < zb / one < 0.35


names = st.sampled_from(["gpipe", "1f1b", "interleaved", "zb-h1"])


@st.composite
def schedules(draw) -> Schedule:
    name = draw(names)
    v = draw(chunk_counts) if name == "interleaved" else 1
    return get(name, draw(stages) * v, draw(micro_batches), chunks=v)


@SETTINGS
@given(schedule=schedules())
def test_text_round_trip(schedule: Schedule):
    again = Schedule.from_text(schedule.to_text(), name=schedule.name,
                               num_stages=schedule.num_stages,
                               num_micro_batches=schedule.num_micro_batches)
    assert again == schedule
    assert validate(again) is again


@SETTINGS
@given(stage=st.integers(0, 99), kind=st.sampled_from("FBIW"), mb=st.integers(0, 999))
def test_action_round_trip(stage: int, kind: str, mb: int):
    a = Action(stage, kind, mb)
    assert Action.parse(a.text(with_stage=True)) == a
    assert Action.parse(str(a), stage=stage) == a


@SETTINGS
@given(schedule=schedules())
def test_unit_costs_reproduce_the_clock(schedule: Schedule):
    """With every action taking 1 and no transfer, event-driven times are the clock's steps."""
    sim = simulate(schedule, Costs(1.0, 1.0, input_grad=1.0, weight_grad=1.0))
    steps = {a: t for t, a in clock(schedule)}
    assert all(start == steps[a] and end == start + 1 for _, a, start, end in sim.timeline)


@SETTINGS
@given(schedule=schedules(), data=st.data())
def test_simulation_invariants_with_per_stage_costs(schedule: Schedule, data: st.DataObject):
    k = schedule.num_stages
    per_stage = st.lists(st.floats(0.1, 3.0), min_size=k, max_size=k)
    costs = Costs(forward=data.draw(per_stage), backward=data.draw(per_stage),
                  weight_grad=data.draw(st.one_of(st.none(), per_stage)),
                  transfer=data.draw(st.floats(0.0, 1.0)))
    sim = simulate(schedule, costs)
    durations = costs.per_stage(k)
    ends = {a: e for _, a, _, e in sim.timeline}
    by_rank: dict[int, list[tuple[float, float]]] = {}
    for rank, a, start, end in sim.timeline:
        assert rank == schedule.rank_of(a.stage)
        assert math.isclose(end - start, durations[a.kind][a.stage], abs_tol=1e-9)
        for dep in dependencies(a, schedule):
            gap = costs.transfer if schedule.rank_of(dep.stage) != rank else 0.0
            assert start >= ends[dep] + gap - 1e-9
        by_rank.setdefault(rank, []).append((start, end))
    for rank, spans in by_rank.items():
        spans.sort()
        assert all(a_end <= b_start + 1e-9 for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
        assert [a for r, a, _, _ in sorted(sim.timeline, key=lambda t: t[2]) if r == rank] == \
            list(schedule.ranks[rank])
    assert len(sim.timeline) == sum(len(r) for r in schedule.ranks)
    assert sim.step_time >= max(sim.busy_time) - 1e-9
    assert 0.0 <= sim.bubble_fraction < 1.0
    slower = simulate(schedule, Costs(costs.forward, costs.backward, costs.input_grad,
                                      costs.weight_grad, transfer=costs.transfer + 0.5))
    assert slower.step_time >= sim.step_time - 1e-9
