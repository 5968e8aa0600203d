"""Property tests: every generated schedule validates, and `simulate` matches the closed forms."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from tfpipe.schedules import (
    FIXED_CHUNKS,
    Action,
    Costs,
    Schedule,
    clock,
    default_chunks,
    dependencies,
    dualpipe_v,
    get,
    gpipe,
    interleaved,
    interleaved_zb,
    looped_bfs,
    min_micro_batches,
    one_f_one_b,
    peak_in_flight,
    simulate,
    validate,
    zb_h1,
    zb_v,
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


@SETTINGS
@given(d=stages, m=micro_batches, v=chunk_counts, backward=backward_costs)
def test_looped_bfs_closed_forms(d: int, m: int, v: int, backward: float):
    """Per-chunk costs 1/v and B/v (a rank's whole forward 1 and backward B, as in GPipe).

    Step time (1 + B) * (max(M, D) + (min(M, D) - 1) / v), interleaved's: for M >= D the
    bubble is (D-1)/(v M + D - 1), GPipe's (D-1)/(M + D - 1) with the fill/drain cut by v.
    Memory is GPipe's: every stage holds all M micro-batches at the turn, a rank v * M chunks.
    """
    schedule = validate(get("looped-bfs", d * v, m, chunks=v))
    assert (schedule.num_ranks, schedule.num_stages) == (d, d * v)
    sim = simulate(schedule, Costs(forward=1.0 / v, backward=backward / v))
    assert close(sim.step_time, (1.0 + backward) * (max(m, d) + (min(m, d) - 1) / v))
    if m >= d:
        assert close(sim.bubble_fraction, (d - 1) / (v * m + d - 1))
    inter = simulate(interleaved(d, m, chunks=v), Costs(forward=1.0 / v, backward=backward / v))
    assert close(sim.step_time, inter.step_time)
    assert sim.peak_in_flight == (m,) * (d * v)


def test_looped_bfs_exact_bubble_for_two_ranks_two_chunks():
    sim = simulate(looped_bfs(2, 4, chunks=2), Costs(forward=0.5, backward=1.0))
    assert close(sim.step_time, 13.5)  # 3 * (4 + 1/2)
    assert close(sim.bubble_fraction, 1 / 9)  # (D-1)/(vM+D-1) = 1/(8+1), GPipe: 1/5
    assert sim.peak_in_flight == (4, 4, 4, 4)  # GPipe's M per stage; 8 chunks on each rank


@SETTINGS
@given(d=stages, m=micro_batches)
def test_zb_v_closed_forms(d: int, m: int):
    """Chunk costs f = i = w = 1/2 (a stage's forward 1, backward 2, as for ZB-H1 and 1F1B).

    Step >= 6 M f + (D - 1) f: rank D-1 waits (D-1) f for the first micro-batch, then has
    6 M f of work. For M >= 2D - 1 ZB-V meets that bound: bubble (D-1)/(6M+D-1), against
    ZB-H1's (D-1)/(3M+D-1) and 1F1B's (D-1)/(M+D-1) on the same D devices; the papers'
    "zero bubble" for F = B = W leaves out this start-up. Memory: rank r holds at most
    min(2D, 2M, M + r + 1) chunk activations (half a stage each), so the busiest holds
    min(D, M) stages' worth, the peak of 1F1B's stage 0; stage s holds min(2D - s, M).
    """
    schedule = validate(get("zb-v", 2 * d, m, chunks=2))
    assert (schedule.num_ranks, schedule.num_stages) == (d, 2 * d)
    assert [schedule.rank_of(s) for s in range(2 * d)] == [*range(d), *reversed(range(d))]
    sim = simulate(schedule, Costs(forward=0.5, backward=1.0))  # I = W = 0.5
    f = 0.5
    assert sim.step_time >= 6 * m * f + (d - 1) * f - 1e-9
    if m >= 2 * d - 1:
        assert close(sim.step_time, 6 * m * f + (d - 1) * f)
        assert close(sim.bubble_fraction, (d - 1) / (6 * m + d - 1))
        zb = simulate(zb_h1(d, m), EQUAL)
        assert sim.bubble_fraction <= zb.bubble_fraction + 1e-12
    one = simulate(one_f_one_b(d, m), EQUAL)
    assert sim.bubble_fraction <= one.bubble_fraction + 1e-12
    for r, actions in enumerate(schedule.ranks):
        live = peak = 0
        for a in actions:
            live += {"F": 1, "I": 0, "W": -1}[a.kind]
            peak = max(peak, live)
        assert peak == min(2 * d, 2 * m, m + r + 1)
    assert max(min(2 * d, 2 * m, m + r + 1) for r in range(d)) / 2 == max(one.peak_in_flight)
    assert sim.peak_in_flight == tuple(min(2 * d - s, m) for s in range(2 * d))


def test_zb_v_bubble_for_four_ranks_eight_micro_batches():
    sim = simulate(zb_v(4, 8), Costs(forward=0.5, backward=1.0))
    assert close(sim.step_time, 25.5)  # 6 * 8 / 2 + 3 / 2
    assert close(sim.bubble_fraction, 3 / 51)  # ZB-H1: 3/27, 1F1B: 3/11


def rank_peaks(schedule: Schedule) -> list[int]:
    """Per rank, the most chunk activations held at once (from F to B, or to W)."""
    peaks = []
    for actions in schedule.ranks:
        live = peak = 0
        for a in actions:
            live += {"F": 1, "B": -1, "I": 0, "W": -1}[a.kind]
            peak = max(peak, live)
        peaks.append(peak)
    return peaks


@SETTINGS
@given(d=stages, m=micro_batches, v=chunk_counts,
       costs=st.sampled_from([EQUAL, Costs(1.0, 1.0), Costs(1.0, 3.0),
                              Costs(1.0, 2.0, transfer=0.25)]))
def test_interleaved_zb_against_interleaved(d: int, m: int, v: int, costs: Costs):
    """Interleaved 1F1B with I in place of B and the Ws filling its waits: never a larger
    bubble than interleaved's (strictly smaller for M >= D >= 2 with F = I = W), at the same
    peak in flight on every stage and the same most chunk activations on every rank."""
    schedule = validate(get("interleaved-zb", d * v, m, chunks=v))
    base = interleaved(d, m, chunks=v)
    assert (schedule.num_ranks, schedule.num_stages) == (d, d * v)
    sim, ref = simulate(schedule, costs), simulate(base, costs)
    assert sim.bubble_fraction <= ref.bubble_fraction + 1e-12
    assert sim.step_time <= ref.step_time + 1e-9
    if costs == EQUAL and m >= d >= 2:
        assert sim.bubble_fraction < ref.bubble_fraction - 1e-9
    per_chunk = Costs(forward=1.0 / v, backward=2.0 / v)  # the docs' costs: a stage's F 1, B 2
    assert simulate(schedule, per_chunk).bubble_fraction <= \
        simulate(base, per_chunk).bubble_fraction + 1e-12
    assert sim.peak_in_flight == ref.peak_in_flight == peak_in_flight(base)
    assert rank_peaks(schedule) == rank_peaks(base)


def test_interleaved_zb_figures_for_two_and_four_ranks():
    """The figures of docs/schedules.md and the module docstring (v = 2, F = I = W = 1/2)."""
    costs = Costs(forward=0.5, backward=1.0)
    sim, ref = simulate(interleaved_zb(2, 4), costs), simulate(interleaved(2, 4), costs)
    assert (sim.step_time, ref.step_time) == (13.0, 13.5)
    assert close(sim.bubble_fraction, 1 / 13) and close(ref.bubble_fraction, 1 / 9)
    assert sim.peak_in_flight == ref.peak_in_flight == (4, 3, 2, 1)
    sim, ref = simulate(interleaved_zb(4, 8), costs), simulate(interleaved(4, 8), costs)
    assert (sim.step_time, ref.step_time) == (27.0, 28.5)
    assert close(sim.bubble_fraction, 3 / 27) and close(ref.bubble_fraction, 9 / 57)
    assert sim.peak_in_flight == ref.peak_in_flight == (8, 8, 7, 5, 4, 4, 3, 1)
    assert rank_peaks(sim.schedule) == rank_peaks(ref.schedule) == [11, 9, 7, 5]
    assert close(simulate(zb_h1(4, 8), EQUAL).bubble_fraction, 3 / 27)  # ZB-H1's, 1 chunk


@SETTINGS
@given(d=stages, extra=st.integers(min_value=0, max_value=12),
       backward=backward_costs, transfer=st.sampled_from([0.0, 0.25]))
def test_dualpipe_v_closed_forms(d: int, extra: int, backward: float, transfer: float):
    """M >= 2D (DualPipeV's least); chunk costs f = 1/2 and B/2 (a stage's forward 1), I = W.

    With B = 2 (F = I = W = f, the README's B = 2W) the step is ZB-V's 6 M f + (D - 1) f: a
    bubble of (D-1)/(6M+D-1). Its bubble is never above 1F1B's on the same D devices, also
    with other backward costs and a transfer delay. Memory: stage s holds 2D - s micro-batches
    at most (ZB-V's), every rank 2D + 1 chunk activations (the DualPipe README's PP + 1; ZB-V
    2D): the forward of an overlapped pair counts before its backward frees one.
    """
    m = 2 * d + extra
    assert min_micro_batches("dualpipe-v", d) == 2 * d
    schedule = validate(get("dualpipe-v", 2 * d, m, chunks=2))
    assert schedule == dualpipe_v(d, m) and (schedule.num_ranks, schedule.num_stages) == (d, 2 * d)
    costs = Costs(forward=0.5, backward=backward / 2, transfer=transfer)
    sim = simulate(schedule, costs)
    one = simulate(one_f_one_b(d, m), Costs(1.0, backward, transfer=transfer))
    assert sim.bubble_fraction <= one.bubble_fraction + 1e-12
    if backward == 2.0 and transfer == 0.0:
        f = 0.5
        assert close(sim.step_time, 6 * m * f + (d - 1) * f)
        assert close(sim.bubble_fraction, (d - 1) / (6 * m + d - 1))
        assert close(sim.step_time, simulate(zb_v(d, m), costs).step_time)
    assert sim.peak_in_flight == tuple(2 * d - s for s in range(2 * d)) == \
        peak_in_flight(zb_v(d, m))
    assert rank_peaks(schedule) == [2 * d + 1] * d
    assert rank_peaks(zb_v(d, m)) == [2 * d] * d


def test_dualpipe_v_figures_for_two_and_four_ranks():
    """The figures of docs/schedules.md and the module docstring (F = I = W = 1/2 per chunk)."""
    costs = Costs(forward=0.5, backward=1.0)
    for d, m, step, bubble, zb, one_step, one_bubble in (
            (2, 4, 12.5, 1 / 25, 12.5, 15.0, 1 / 5), (4, 8, 25.5, 3 / 51, 25.5, 33.0, 3 / 11)):
        sim = simulate(dualpipe_v(d, m), costs)
        one = simulate(one_f_one_b(d, m), EQUAL)
        assert sim.step_time == step and close(sim.bubble_fraction, bubble)
        assert simulate(zb_v(d, m), costs).step_time == zb
        assert one.step_time == one_step and close(one.bubble_fraction, one_bubble)
    assert sim.peak_in_flight == (8, 7, 6, 5, 4, 3, 2, 1)  # 1F1B: (4, 3, 2, 1) of twice the size
    assert rank_peaks(sim.schedule) == [9, 9, 9, 9]  # ZB-V: 8
    # W as long as a whole backward (what the executor's W cost while it re-derived the chain):
    # fewer split backwards than ZB-V, so a shorter step
    rederive = Costs(forward=0.5, backward=1.0, input_grad=0.5, weight_grad=1.0)
    for d, m, splits, steps in ((2, 4, (5, 16), (13.5, 16.5)), (4, 8, (22, 64), (27.5, 34.5))):
        pair = (dualpipe_v(d, m), zb_v(d, m))
        assert tuple(sum(a.kind == "I" for r in x.ranks for a in r) for x in pair) == splits
        assert tuple(simulate(x, rederive).step_time for x in pair) == steps


names = st.sampled_from(["gpipe", "1f1b", "interleaved", "zb-h1", "looped-bfs", "zb-v",
                         "interleaved-zb", "dualpipe-v"])


@st.composite
def schedules(draw) -> Schedule:
    name = draw(names)
    v = 2 if name in FIXED_CHUNKS else draw(chunk_counts) if default_chunks(name) > 1 else 1
    d = draw(stages)
    return get(name, d * v, max(draw(micro_batches), min_micro_batches(name, d)), chunks=v)


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
