"""`tfpipe.executor.steady.steady_phase`: a schedule cut into warm-up, one loop iteration and
cool-down, checked on literal tables."""

from __future__ import annotations

from tfpipe.executor.steady import steady_phase
from tfpipe.schedules import gpipe, interleaved, one_f_one_b, zb_h1


def rows(part):
    return [" ".join(a.text(True) for a in row) for row in part]


def test_1f1b_loops_its_steady_pairs_and_traces_the_rest_around_them():
    cut = steady_phase(one_f_one_b(4, 8), [(0, 1), (1, 2), (2, 3)])
    assert rows(cut.before) == ["0F0 0F1 0F2", "1F0 1F1", "2F0", ""]
    assert rows(cut.body) == ["0F3 0B0", "1F2 1B0", "2F1 2B0", "3F0 3B0"]
    assert cut.count == 5  # the fewest steady pairs a rank has: M - K + 1
    assert rows(cut.after) == ["0B5 0B6 0B7", "1F7 1B5 1B6 1B7", "2F6 2B5 2F7 2B6 2B7",
                               "3F5 3B5 3F6 3B6 3F7 3B7"]
    # an activation is read one iteration after it is made, stage s's residuals K-1-s after
    assert [cut.delay((s, "F"), (s + 1, "F")) for s in range(3)] == [1, 1, 1]
    assert [cut.delay((s, "F"), (s, "B")) for s in range(4)] == [3, 2, 1, 0]
    assert [cut.delay((s + 1, "B"), (s, "B")) for s in range(3)] == [0, 0, 0]


def test_a_skip_connection_is_carried_as_long_as_it_spans():
    cut = steady_phase(one_f_one_b(4, 8), [(0, 1), (1, 2), (2, 3), (0, 3)])
    assert cut is not None and cut.delay((0, "F"), (3, "F")) == 3
    assert cut.delay((3, "B"), (0, "B")) == 0


def test_every_action_is_in_exactly_one_place():
    schedule = one_f_one_b(3, 7)
    cut = steady_phase(schedule, [(0, 1), (1, 2)])
    for r, row in enumerate(schedule.ranks):
        looped = [a.__class__(a.stage, a.kind, a.micro_batch + i)
                  for i in range(cut.count) for a in cut.body[r]]
        assert list(row) == cut.before[r] + looped + cut.after[r]


def test_schedules_without_one_steady_phase_are_not_cut():
    assert steady_phase(gpipe(2, 4), [(0, 1)]) is None  # all forwards, then all backwards
    assert steady_phase(zb_h1(2, 4), [(0, 1)]) is None  # split backward
    assert steady_phase(one_f_one_b(4, 4), [(0, 1), (1, 2), (2, 3)]) is None  # one iteration
    # Megatron's interleaving steps micro-batches in groups of K per chunk: no one-step period
    assert steady_phase(interleaved(2, 4, 2), [(0, 1), (1, 2), (2, 3)]) is None
