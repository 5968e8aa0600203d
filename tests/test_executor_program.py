"""The executor's pure passes over schedules: literal tables of trace order, waits and replica runs.

(That `executor.program` imports no TensorFlow is checked by tests/test_architecture.py.)
"""

from __future__ import annotations

from tfpipe.executor.program import (
    Program,
    global_rank,
    gradient_waits,
    rank_waits,
    replica_runs,
    replicate_waits,
    scope_name,
    shift,
    trace_order,
)
from tfpipe.schedules import Action, gpipe, interleaved, one_f_one_b, zb_h1


def texts(actions):
    return [a.text(with_stage=True) for a in actions]


def table(waits):
    return {a.text(with_stage=True): w.text(with_stage=True) for a, w in waits.items()}


# ----------------------------------------------------------------------------------------
# Trace order: `clock` order, so every input exists when an action is traced.

def test_trace_order_of_1f1b():
    assert texts(trace_order(one_f_one_b(2, 3))) == [
        "0F0", "0F1", "1F0", "1B0", "0B0", "1F1", "0F2", "1B1", "0B1", "1F2", "1B2", "0B2",
    ]


def test_trace_order_of_gpipe():
    # unit-time clock: 1B1 and 0B0 both run at step 4, listed by rank
    assert texts(trace_order(gpipe(2, 2))) == ["0F0", "0F1", "1F0", "1F1", "1B0", "0B0", "1B1", "0B1"]


# ----------------------------------------------------------------------------------------
# Waits: which earlier action of its rank each action is held behind.

def test_forward_waits_of_1f1b_two_stages_three_micro_batches():
    # rank 0: F0 F1 B0 F2 B1 B2; rank 1: F0 B0 F1 B1 F2 B2
    assert table(rank_waits(one_f_one_b(2, 3))) == {"0F2": "0B0", "1F1": "1B0", "1F2": "1B1"}


def test_gpipe_forwards_wait_on_nothing():
    assert rank_waits(gpipe(3, 4)) == {}


def test_replay_waits_of_1f1b_chain_the_backwards_of_a_rank():
    assert table(rank_waits(one_f_one_b(2, 3), kinds="BI")) == {
        "0B1": "0B0", "0B2": "0B1", "1B1": "1B0", "1B2": "1B1",
    }


def test_waits_of_zb_h1_count_input_and_weight_gradients():
    # rank 0: F0 F1 I0 W0 F2 I1 W1 I2 W2; rank 1: F0 I0 F1 I1 W0 F2 I2 W1 W2
    schedule = zb_h1(2, 3)
    assert table(rank_waits(schedule)) == {"0F2": "0W0", "1F1": "1I0", "1F2": "1W0"}
    assert table(rank_waits(schedule, kinds="BI")) == {
        "0I1": "0W0", "0I2": "0W1", "1I1": "1I0", "1I2": "1W0",
    }


def test_gradient_waits_chain_the_weight_gradient_sums_of_a_rank():
    # GPipe: every backward of a rank after the one before it; ZB-H1: the Is, which take the
    # weight gradients (the Ws have nothing left to add)
    assert table(gradient_waits(gpipe(2, 3))) == {
        "0B1": "0B0", "0B2": "0B1", "1B1": "1B0", "1B2": "1B1",
    }
    assert table(gradient_waits(zb_h1(2, 3))) == {
        "0I1": "0I0", "0I2": "0I1", "1I1": "1I0", "1I2": "1I1",
    }
    assert Program.build(gpipe(2, 2), replicas=2).gradient_waits[Action(0, "B", 3)] == Action(
        0, "B", 2)  # replica 1's micro-batches 2 and 3


def test_interleaved_waits_cross_the_chunks_of_a_rank():
    # 2 ranks, 2 chunks: rank 0 runs stages 0 and 2, rank 1 stages 1 and 3
    # rank0: 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3
    # rank1: 1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3
    assert table(rank_waits(interleaved(2, 4, chunks=2))) == {
        "0F3": "2B0", "2F2": "2B1", "2F3": "0B0",
        "3F1": "3B0", "1F2": "3B1", "1F3": "1B0", "3F2": "1B1", "3F3": "3B2",
    }


# ----------------------------------------------------------------------------------------
# Replicas: copy r runs micro-batches r*M .. r*M+M-1, interleaved run by run.

def test_shift_names_the_replicas_micro_batches():
    assert shift(Action(1, "B", 2), 0, 3) == Action(1, "B", 2)
    assert shift(Action(1, "B", 2), 2, 3) == Action(1, "B", 8)


def test_replica_runs_of_gpipe_two_replicas():
    runs = replica_runs(trace_order(gpipe(2, 1)), 2, 1)
    assert [(r, a.text(with_stage=True)) for r, a in runs] == [
        (0, "0F0"), (1, "0F1"), (0, "1F0"), (1, "1F1"), (0, "1B0"), (1, "1B1"), (0, "0B0"), (1, "0B1"),
    ]


def test_replicated_waits_of_1f1b():
    waits = replicate_waits(rank_waits(one_f_one_b(2, 2)), 2, 2)
    assert table(waits) == {"1F1": "1B0", "1F3": "1B2"}


def test_program_of_1f1b_two_replicas():
    program = Program.build(one_f_one_b(2, 2), 2)
    assert len(program.runs) == 2 * 8
    assert [(r, a.text(with_stage=True)) for r, a in program.forward_runs] == [
        (0, "0F0"), (1, "0F2"), (0, "0F1"), (1, "0F3"), (0, "1F0"), (1, "1F2"), (0, "1F1"), (1, "1F3"),
    ]
    assert table(program.waits) == {"1F1": "1B0", "1F3": "1B2"}
    assert table(program.replay_waits) == {"0B1": "0B0", "0B3": "0B2", "1B1": "1B0", "1B3": "1B2"}


def test_scope_names_and_timeline_rows():
    assert scope_name(0, Action(1, "W", 2), 1) == "stage1_W2"
    assert scope_name(1, Action(1, "W", 5), 2) == "replica1_stage1_W5"
    schedule = interleaved(2, 4, chunks=2)
    assert [global_rank(schedule, 0, Action(s, "F", 0)) for s in range(4)] == [0, 1, 0, 1]
    assert global_rank(schedule, 1, Action(3, "F", 4)) == 3


def test_rank_rows_of_interleaved_name_each_stage_and_kind_once_per_rank():
    from tfpipe.executor.program import RankRows
    from tfpipe.schedules import interleaved

    rows = RankRows.build(interleaved(2, 2, 2))
    assert rows.branches == [[(0, "F"), (2, "F"), (2, "B"), (0, "B")],
                             [(1, "F"), (3, "F"), (3, "B"), (1, "B")]]
    for r, row in enumerate(interleaved(2, 2, 2).ranks):
        assert [rows.branches[r][c] for c in rows.codes[r]] == [(a.stage, a.kind) for a in row]
        assert rows.micro_batches[r] == [a.micro_batch for a in row]


def test_rank_rows_give_each_micro_batch_a_residual_slot_until_its_backward():
    from tfpipe.executor.program import RankRows
    from tfpipe.schedules import gpipe, interleaved, one_f_one_b

    # 1F1B, K = 3, M = 5: stage s holds at most K - s micro-batches; rank 0's row is
    # F0 F1 F2 B0 F3 B1 F4 B2 B3 B4, and F3 takes the slot B0 freed
    rows = RankRows.build(one_f_one_b(3, 5))
    assert rows.width == {0: 3, 1: 2, 2: 1}
    assert rows.slots[0] == [0, 1, 2, 0, 0, 1, 1, 2, 0, 1]
    assert rows.slots[2] == [0] * 10
    assert rows.ages[0] == [0, 0, 0, 2, 0, 2, 0, 2, 1, 0]  # forwards run since their own
    assert rows.depth == rows.width
    assert RankRows.build(gpipe(2, 4)).width == {0: 4, 1: 4}  # all forwards before backwards
    for schedule in (one_f_one_b(4, 8), interleaved(2, 4, 2), gpipe(3, 3)):
        rows = RankRows.build(schedule)
        for r, row in enumerate(schedule.ranks):
            filled: dict[tuple[int, int], int] = {}
            for a, slot in zip(row, rows.slots[r]):
                assert 0 <= slot < rows.width[a.stage]
                if a.kind == "F":  # no two micro-batches in flight share a slot
                    assert (a.stage, slot) not in filled
                    filled[(a.stage, slot)] = a.micro_batch
                else:
                    assert filled.pop((a.stage, slot)) == a.micro_batch
            rings: dict[int, list[int]] = {}  # per stage, its forwards, latest first
            for a, age in zip(row, rows.ages[r]):
                ring = rings.setdefault(a.stage, [])
                if a.kind == "F":
                    ring.insert(0, a.micro_batch)
                else:  # a backward finds its micro-batch at its age, within the depth
                    assert age < rows.depth[a.stage] and ring[age] == a.micro_batch


def test_loop_refusal_names_split_backward_and_out_of_order_queues():
    from tfpipe.executor.program import loop_refusal
    from tfpipe.schedules import Action, Schedule, one_f_one_b, zb_h1

    assert loop_refusal(one_f_one_b(3, 4), [(0, 1), (1, 2), (0, 2)]) is None
    assert "splits backward into I and W" in loop_refusal(zb_h1(2, 4), [(0, 1)])
    # stage 1 runs its forwards in the order 1, 0: one queue from stage 0 would swap them
    swapped = Schedule("swapped", 2, 2, (
        (Action(0, "F", 0), Action(0, "F", 1), Action(0, "B", 0), Action(0, "B", 1)),
        (Action(1, "F", 1), Action(1, "F", 0), Action(1, "B", 0), Action(1, "B", 1)),
    ))
    assert "do not run their micro-batches in the same order" in loop_refusal(swapped, [(0, 1)])
