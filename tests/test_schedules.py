"""Schedules as data: literal grids of the generators, text round trips, validation errors, registry."""

from __future__ import annotations

import ast
import doctest
import importlib
import pathlib
import subprocess
import sys
import textwrap

import pytest

from tfpipe.errors import PipelineError
from tfpipe.schedules import (
    FIXED_CHUNKS,
    GENERATORS,
    Action,
    Costs,
    Schedule,
    ScheduleError,
    default_chunks,
    dependencies,
    dualpipe_v,
    dualpipe_v_stages,
    format_schedule,
    get,
    gpipe,
    interleaved,
    interleaved_stages,
    interleaved_zb,
    interleaved_zb_stages,
    looped_bfs,
    looped_bfs_stages,
    min_micro_batches,
    one_f_one_b,
    simulate,
    validate,
    zb_h1,
    zb_v,
    zb_v_stages,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCHEDULES_DIR = ROOT / "tfpipe" / "schedules"


def grid(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


# ----------------------------------------------------------------------------------------
# Literal grids and text forms of each generator.

LITERAL_CASES = [
    (gpipe(2, 2), """
        step   0   1   2   3   4   5
        rank0  F0  F1  .   .   B0  B1
        rank1  .   F0  F1  B0  B1  .
        """, ["F0 F1 B0 B1", "F0 F1 B0 B1"]),
    (gpipe(3, 3), """
        step   0   1   2   3   4   5   6   7   8   9
        rank0  F0  F1  F2  .   .   .   .   B0  B1  B2
        rank1  .   F0  F1  F2  .   .   B0  B1  B2  .
        rank2  .   .   F0  F1  F2  B0  B1  B2  .   .
        """, ["F0 F1 F2 B0 B1 B2"] * 3),
    (gpipe(4, 6), """
        step   0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17
        rank0  F0  F1  F2  F3  F4  F5  .   .   .   .   .   .   B0  B1  B2  B3  B4  B5
        rank1  .   F0  F1  F2  F3  F4  F5  .   .   .   .   B0  B1  B2  B3  B4  B5  .
        rank2  .   .   F0  F1  F2  F3  F4  F5  .   .   B0  B1  B2  B3  B4  B5  .   .
        rank3  .   .   .   F0  F1  F2  F3  F4  F5  B0  B1  B2  B3  B4  B5  .   .   .
        """, ["F0 F1 F2 F3 F4 F5 B0 B1 B2 B3 B4 B5"] * 4),
    (one_f_one_b(2, 4), """
        step   0   1   2   3   4   5   6   7   8   9
        rank0  F0  F1  .   B0  F2  B1  F3  B2  .   B3
        rank1  .   F0  B0  F1  B1  F2  B2  F3  B3  .
        """, ["F0 F1 B0 F2 B1 F3 B2 B3", "F0 B0 F1 B1 F2 B2 F3 B3"]),
    (one_f_one_b(3, 5), """
        step   0   1   2   3   4   5   6   7   8   9   10  11  12  13
        rank0  F0  F1  F2  .   .   B0  F3  B1  F4  B2  .   B3  .   B4
        rank1  .   F0  F1  .   B0  F2  B1  F3  B2  F4  B3  .   B4  .
        rank2  .   .   F0  B0  F1  B1  F2  B2  F3  B3  F4  B4  .   .
        """, [
        "F0 F1 F2 B0 F3 B1 F4 B2 B3 B4",
        "F0 F1 B0 F2 B1 F3 B2 F4 B3 B4",
        "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4",
    ]),
    (one_f_one_b(4, 8), """
        step   0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17  18  19  20  21
        rank0  F0  F1  F2  F3  .   .   .   B0  F4  B1  F5  B2  F6  B3  F7  B4  .   B5  .   B6  .   B7
        rank1  .   F0  F1  F2  .   .   B0  F3  B1  F4  B2  F5  B3  F6  B4  F7  B5  .   B6  .   B7  .
        rank2  .   .   F0  F1  .   B0  F2  B1  F3  B2  F4  B3  F5  B4  F6  B5  F7  B6  .   B7  .   .
        rank3  .   .   .   F0  B0  F1  B1  F2  B2  F3  B3  F4  B4  F5  B5  F6  B6  F7  B7  .   .   .
        """, [
        "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7",
        "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7",
        "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7",
        "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7",
    ]),
    (one_f_one_b(4, 2), """
        step   0   1   2   3   4   5   6   7   8   9
        rank0  F0  F1  .   .   .   .   .   B0  .   B1
        rank1  .   F0  F1  .   .   .   B0  .   B1  .
        rank2  .   .   F0  F1  .   B0  .   B1  .   .
        rank3  .   .   .   F0  B0  F1  B1  .   .   .
        """, ["F0 F1 B0 B1", "F0 F1 B0 B1", "F0 F1 B0 B1", "F0 B0 F1 B1"]),
    (interleaved(2, 4, chunks=2), """
        step   0    1    2    3    4    5    6    7    8    9    10   11   12   13   14   15   16   17
        rank0  0F0  0F1  2F0  2F1  0F2  2B0  0F3  2B1  2F2  0B0  2F3  0B1  .    2B2  .    2B3  0B2  0B3
        rank1  .    1F0  1F1  3F0  3B0  3F1  3B1  1F2  1B0  1F3  1B1  3F2  3B2  3F3  3B3  1B2  1B3  .
        """, [
        "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3",
        "1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3",
    ]),
    (looped_bfs(2, 4, chunks=2), """
        step   0    1    2    3    4    5    6    7    8    9    10   11   12   13   14   15   16   17
        rank0  0F0  0F1  0F2  0F3  2F0  2F1  2F2  2F3  .    .    2B3  2B2  2B1  2B0  0B3  0B2  0B1  0B0
        rank1  .    1F0  1F1  1F2  1F3  3F0  3F1  3F2  3F3  3B3  3B2  3B1  3B0  1B3  1B2  1B1  1B0  .
        """, [
        "0F0 0F1 0F2 0F3 2F0 2F1 2F2 2F3 2B3 2B2 2B1 2B0 0B3 0B2 0B1 0B0",
        "1F0 1F1 1F2 1F3 3F0 3F1 3F2 3F3 3B3 3B2 3B1 3B0 1B3 1B2 1B1 1B0",
    ]),
    # M < D: micro-batch 0 comes back to rank 0 for stage 3 before rank 0 could start it.
    (looped_bfs(3, 2, chunks=2), """
        step   0    1    2    3    4    5    6    7    8    9    10   11   12   13
        rank0  0F0  0F1  .    3F0  3F1  .    .    .    .    3B1  3B0  .    0B1  0B0
        rank1  .    1F0  1F1  .    4F0  4F1  .    .    4B1  4B0  .    1B1  1B0  .
        rank2  .    .    2F0  2F1  .    5F0  5F1  5B1  5B0  .    2B1  2B0  .    .
        """, [
        "0F0 0F1 3F0 3F1 3B1 3B0 0B1 0B0",
        "1F0 1F1 4F0 4F1 4B1 4B0 1B1 1B0",
        "2F0 2F1 5F0 5F1 5B1 5B0 2B1 2B0",
    ]),
    (zb_v(2, 4), """
        step   0    1    2    3    4    5    6    7    8    9    10   11   12   13   14   15   16   17   18   19   20   21   22   23   24
        rank0  0F0  0F1  0F2  3F0  3I0  3W0  3F1  3I1  3W1  0F3  0I0  0W0  3F2  3I2  3W2  0I1  0W1  3F3  3I3  3W3  0I2  0W2  0I3  0W3  .
        rank1  .    1F0  2F0  1F1  2F1  2I0  2W0  1F2  1I0  1W0  2F2  2I1  2W1  1F3  1I1  1W1  2F3  2I2  2W2  1I2  2I3  1I3  1W2  2W3  1W3
        """, [
        "0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0F3 0I0 0W0 3F2 3I2 3W2 0I1 0W1 3F3 3I3 3W3 0I2 0W2 "
        "0I3 0W3",
        "1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1F3 1I1 1W1 2F3 2I2 2W2 1I2 2I3 1I3 1W2 "
        "2W3 1W3",
    ]),
    # M < 2D - 1: built for 2D - 1 = 5 micro-batches, those of micro-batches 2..4 left out.
    (zb_v(3, 2), """
        step   0    1    2    3    4    5    6    7    8    9    10   11   12   13   14   15   16   17
        rank0  0F0  0F1  .    .    .    5F0  5I0  5W0  5F1  5I1  5W1  .    .    0I0  0W0  .    0I1  0W1
        rank1  .    1F0  1F1  .    4F0  .    4F1  4I0  4W0  .    4I1  4W1  1I0  1W0  .    1I1  1W1  .
        rank2  .    .    2F0  3F0  2F1  3F1  .    .    3I0  3W0  2I0  2W0  3I1  3W1  2I1  2W1  .    .
        """, [
        "0F0 0F1 5F0 5I0 5W0 5F1 5I1 5W1 0I0 0W0 0I1 0W1",
        "1F0 1F1 4F0 4F1 4I0 4W0 4I1 4W1 1I0 1W0 1I1 1W1",
        "2F0 3F0 2F1 3F1 3I0 3W0 2I0 2W0 3I1 3W1 2I1 2W1",
    ]),
    (interleaved_zb(2, 4, chunks=2), """
        step   0    1    2    3    4    5    6    7    8    9    10   11   12   13   14   15   16   17   18   19   20   21   22   23   24   25
        rank0  0F0  0F1  2F0  2F1  0F2  2I0  2W0  0F3  2I1  2W1  2F2  0I0  0W0  2F3  0I1  0W1  .    2I2  2W2  .    2I3  0I2  0I3  2W3  0W2  0W3
        rank1  .    1F0  1F1  3F0  3I0  3W0  3F1  3I1  3W1  1F2  1I0  1W0  1F3  1I1  1W1  3F2  3I2  3W2  3F3  3I3  1I2  1I3  3W3  1W2  1W3  .
        """, [
        "0F0 0F1 2F0 2F1 0F2 2I0 2W0 0F3 2I1 2W1 2F2 0I0 0W0 2F3 0I1 0W1 2I2 2W2 2I3 0I2 0I3 2W3 "
        "0W2 0W3",
        "1F0 1F1 3F0 3I0 3W0 3F1 3I1 3W1 1F2 1I0 1W0 1F3 1I1 1W1 3F2 3I2 3W2 3F3 3I3 1I2 1I3 3W3 "
        "1W2 1W3",
    ]),
    # M = D: rank 0 waits for the first I, then the Ws fill the cool-down's waits.
    (interleaved_zb(2, 2, chunks=2), """
        step   0    1    2    3    4    5    6    7    8    9    10   11   12   13
        rank0  0F0  0F1  2F0  2F1  .    2I0  2W0  .    2I1  0I0  0I1  2W1  0W0  0W1
        rank1  .    1F0  1F1  3F0  3I0  3W0  3F1  3I1  1I0  1I1  3W1  1W0  1W1  .
        """, [
        "0F0 0F1 2F0 2F1 2I0 2W0 2I1 0I0 0I1 2W1 0W0 0W1",
        "1F0 1F1 3F0 3I0 3W0 3F1 3I1 1I0 1I1 3W1 1W0 1W1",
    ]),
    # DualPipeV at its least M = 2D: overlapped F&B pairs are adjacent (0F3 3B1, 3F2 0B0, ...);
    # most backwards whole (B), the first and last few split (I, W later).
    (dualpipe_v(2, 4), """
        step   0    1    2    3    4    5    6    7    8    9    10   11   12   13   14   15   16   17   18
        rank0  0F0  0F1  0F2  3F0  3I0  3W0  3F1  0F3  3B1  3F2  0B0  3B2  3F3  0B1  3B3  0I2  0W2  0I3  0W3
        rank1  .    1F0  2F0  1F1  2F1  1F2  2B0  2F2  1B0  1F3  2B1  2F3  1B1  2B2  1B2  2I3  1I3  2W3  1W3
        """, [
        "0F0 0F1 0F2 3F0 3I0 3W0 3F1 0F3 3B1 3F2 0B0 3B2 3F3 0B1 3B3 0I2 0W2 0I3 0W3",
        "1F0 2F0 1F1 2F1 1F2 2B0 2F2 1B0 1F3 2B1 2F3 1B1 2B2 1B2 2I3 1I3 2W3 1W3",
    ]),
    (dualpipe_v(4, 8), """
        step   0    1    2    3    4    5    6    7    8    9    10   11   12   13   14   15   16   17   18   19   20   21   22   23   24   25   26   27   28   29   30   31   32   33   34   35   36   37   38
        rank0  0F0  0F1  0F2  0F3  0F4  0F5  0F6  7F0  7I0  7W0  7F1  7I1  7W1  7F2  7I2  7W2  7F3  0F7  7B3  7F4  0B0  7B4  7F5  0B1  7B5  7F6  0B2  7B6  7F7  0B3  7B7  0I4  0W4  0I5  0W5  0I6  0W6  0I7  0W7
        rank1  .    1F0  1F1  1F2  1F3  1F4  6F0  1F5  6F1  6I0  6W0  6F2  6I1  6W1  6F3  1F6  6B2  6F4  1B0  1F7  6B3  6F5  1B1  6B4  6F6  1B2  6B5  6F7  1B3  6B6  1B4  6I7  1I5  6W7  1I6  1W5  1I7  1W6  1W7
        rank2  .    .    2F0  2F1  2F2  5F0  2F3  5F1  2F4  5F2  5I0  5W0  5F3  2F5  5B1  5F4  2B0  2F6  5B2  5F5  2B1  2F7  5B3  5F6  2B2  5B4  5F7  2B3  5B5  2B4  5B6  2I5  5I7  2I6  2W5  2I7  5W7  2W6  2W7
        rank3  .    .    .    3F0  4F0  3F1  4F1  3F2  4F2  3F3  4F3  3F4  4B0  4F4  3B0  3F5  4B1  4F5  3B1  3F6  4B2  4F6  3B2  3F7  4B3  4F7  3B3  4B4  3B4  4B5  3B5  4I6  3I6  4I7  3I7  4W6  3W6  4W7  3W7
        """, [
        "0F0 0F1 0F2 0F3 0F4 0F5 0F6 7F0 7I0 7W0 7F1 7I1 7W1 7F2 7I2 7W2 7F3 0F7 7B3 7F4 0B0 7B4 "
        "7F5 0B1 7B5 7F6 0B2 7B6 7F7 0B3 7B7 0I4 0W4 0I5 0W5 0I6 0W6 0I7 0W7",
        "1F0 1F1 1F2 1F3 1F4 6F0 1F5 6F1 6I0 6W0 6F2 6I1 6W1 6F3 1F6 6B2 6F4 1B0 1F7 6B3 6F5 1B1 "
        "6B4 6F6 1B2 6B5 6F7 1B3 6B6 1B4 6I7 1I5 6W7 1I6 1W5 1I7 1W6 1W7",
        "2F0 2F1 2F2 5F0 2F3 5F1 2F4 5F2 5I0 5W0 5F3 2F5 5B1 5F4 2B0 2F6 5B2 5F5 2B1 2F7 5B3 5F6 "
        "2B2 5B4 5F7 2B3 5B5 2B4 5B6 2I5 5I7 2I6 2W5 2I7 5W7 2W6 2W7",
        "3F0 4F0 3F1 4F1 3F2 4F2 3F3 4F3 3F4 4B0 4F4 3B0 3F5 4B1 4F5 3B1 3F6 4B2 4F6 3B2 3F7 4B3 "
        "4F7 3B3 4B4 3B4 4B5 3B5 4I6 3I6 4I7 3I7 4W6 3W6 4W7 3W7",
    ]),
    (zb_h1(2, 4), """
        step   0   1   2   3   4   5   6   7   8   9   10  11  12
        rank0  F0  F1  .   I0  W0  F2  I1  W1  F3  I2  W2  I3  W3
        rank1  .   F0  I0  F1  I1  W0  F2  I2  W1  F3  I3  W2  W3
        """, ["F0 F1 I0 W0 F2 I1 W1 F3 I2 W2 I3 W3", "F0 I0 F1 I1 W0 F2 I2 W1 F3 I3 W2 W3"]),
    (zb_h1(3, 6), """
        step   0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17  18  19
        rank0  F0  F1  F2  .   .   I0  W0  F3  I1  W1  F4  I2  W2  F5  I3  W3  I4  W4  I5  W5
        rank1  .   F0  F1  .   I0  F2  I1  W0  F3  I2  W1  F4  I3  W2  F5  I4  W3  I5  W4  W5
        rank2  .   .   F0  I0  F1  I1  F2  I2  W0  F3  I3  W1  F4  I4  W2  F5  I5  W3  W4  W5
        """, [
        "F0 F1 F2 I0 W0 F3 I1 W1 F4 I2 W2 F5 I3 W3 I4 W4 I5 W5",
        "F0 F1 I0 F2 I1 W0 F3 I2 W1 F4 I3 W2 F5 I4 W3 I5 W4 W5",
        "F0 I0 F1 I1 F2 I2 W0 F3 I3 W1 F4 I4 W2 F5 I5 W3 W4 W5",
    ]),
]
LITERAL_IDS = [
    f"{s.name}-K{s.num_stages}-M{s.num_micro_batches}" for s, _, _ in LITERAL_CASES
]


@pytest.mark.parametrize("schedule,expected_grid,expected_text", LITERAL_CASES, ids=LITERAL_IDS)
def test_literal_grid_and_text(schedule: Schedule, expected_grid: str, expected_text: list[str]):
    assert format_schedule(validate(schedule)) == grid(expected_grid)
    assert schedule.to_text() == expected_text


@pytest.mark.parametrize("schedule,expected_grid,expected_text", LITERAL_CASES, ids=LITERAL_IDS)
def test_text_round_trip(schedule: Schedule, expected_grid: str, expected_text: list[str]):
    parsed = Schedule.from_text(expected_text, name=schedule.name)
    assert parsed == schedule
    assert parsed.to_text() == expected_text
    for actions in schedule.ranks:
        for a in actions:
            assert Action.parse(a.text(with_stage=True)) == a
            assert Action.parse(str(a), stage=a.stage) == a


def test_interleaved_places_stage_on_rank_modulo_ranks():
    s = interleaved(3, 6, chunks=4)
    assert (s.num_ranks, s.num_stages) == (3, 12)
    assert all(s.rank_of(stage) == stage % 3 for stage in range(12))


def test_interleaved_with_one_chunk_is_1f1b():
    assert interleaved(4, 6, chunks=1).ranks == one_f_one_b(4, 6).ranks


def test_looped_bfs_places_stages_like_interleaved_and_runs_them_breadth_first():
    s = looped_bfs(3, 4, chunks=2)
    assert (s.num_ranks, s.num_stages) == (3, 6)
    assert all(s.rank_of(stage) == stage % 3 for stage in range(6))
    for r, actions in enumerate(s.ranks):
        # every forward of stage r, then of stage r + 3; backwards the mirror image
        assert [(a.stage, a.kind) for a in actions[:8]] == [(r, "F")] * 4 + [(r + 3, "F")] * 4
        assert actions[8:] == tuple(Action(a.stage, "B", a.micro_batch) for a in
                                    reversed(actions[:8]))


def test_looped_bfs_with_one_chunk_is_gpipe_with_backwards_reversed():
    s, g = looped_bfs(3, 4, chunks=1), gpipe(3, 4)
    assert [r[:4] for r in s.ranks] == [r[:4] for r in g.ranks]
    assert [r[4:] for r in s.ranks] == [tuple(reversed(r[4:])) for r in g.ranks]


def test_zb_v_places_stages_in_a_v_with_split_backwards():
    s = zb_v(4, 8)
    assert (s.num_ranks, s.num_stages) == (4, 8)
    assert [s.rank_of(stage) for stage in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]
    assert all(s.splits_backward(k) for k in range(8))
    assert not any(a.kind == "B" for r in s.ranks for a in r)
    assert zb_v_stages(8, 8, chunks=2) == s == get("zb-v", 8, 8, chunks=2)


@pytest.mark.parametrize("args,fragment", [
    ((4, 3, 1), r"num_stages=4 with chunks=1 was asked for: use chunks=2 .* num_stages=8 "
                r"\(the model cut in 8 pieces on 4 devices\)"),
    ((5, 3, 2), r"num_stages=5 with chunks=2 .* num_stages=4 \(the model cut in 4 pieces on 2"),
])
def test_zb_v_refuses_other_chunks_showing_the_grid_it_would_run(args, fragment):
    with pytest.raises(ValueError, match=fragment) as error:
        zb_v_stages(*args)
    message = str(error.value)
    assert "places two stages on each rank in a V" in message
    assert "step   0" in message and "rank0  0F0  0F1" in message  # the grid it would run


@pytest.mark.parametrize("ranks,m,chunks", [(2, 4, 2), (3, 5, 2), (4, 8, 3), (3, 2, 2), (2, 6, 1)])
def test_interleaved_zb_is_interleaved_with_split_backwards(ranks: int, m: int, chunks: int):
    s, base = interleaved_zb(ranks, m, chunks=chunks), interleaved(ranks, m, chunks=chunks)
    assert (s.num_ranks, s.num_stages) == (ranks, ranks * chunks)
    assert all(s.rank_of(stage) == stage % ranks for stage in range(ranks * chunks))
    assert all(s.splits_backward(k) for k in range(ranks * chunks))
    for mine, theirs in zip(s.ranks, base.ranks):
        # interleaved's forwards and backwards in interleaved's order, each B as I ...
        assert [a for a in mine if a.kind != "W"] == [
            Action(a.stage, "I" if a.kind == "B" else "F", a.micro_batch) for a in theirs]
        # ... and each W after its own I
        ran = [a for a in mine if a.kind != "F"]
        assert all(ran.index(Action(a.stage, "I", a.micro_batch)) < ran.index(a)
                   for a in ran if a.kind == "W")
    assert interleaved_zb_stages(ranks * chunks, m, chunks=chunks) == s
    assert get("interleaved-zb", ranks * chunks, m, chunks=chunks) == s


def test_get_interleaved_zb_refuses_indivisible_stages():
    with pytest.raises(ValueError, match=r"Interleaved zero-bubble schedule: num_stages=5 is "
                       r"not divisible by chunks=2.*4 or 6"):
        get("interleaved-zb", 5, 4, chunks=2)


@pytest.mark.parametrize("ranks,m", [(1, 2), (2, 4), (3, 6), (3, 9), (4, 8), (5, 13)])
def test_dualpipe_v_is_pytorchs_order_in_a_v(ranks: int, m: int):
    """The phases of PyTorch's ScheduleDualPipeV._calculate_single_rank_operations, counted."""
    s = dualpipe_v(ranks, m)
    assert (s.num_ranks, s.num_stages) == (ranks, 2 * ranks)
    assert [s.rank_of(k) for k in range(2 * ranks)] == [*range(ranks), *reversed(range(ranks))]
    assert dualpipe_v_stages(2 * ranks, m, chunks=2) == s == get("dualpipe-v", 2 * ranks, m,
                                                                  chunks=2)
    for r, actions in enumerate(s.ranks):
        first, second = r, 2 * ranks - 1 - r
        before, after = ranks - r - 1, r + 1
        kinds = [(a.stage, a.kind) for a in actions]
        warm = 2 * before + 2 * after
        assert kinds[:warm] == [(first, "F")] * 2 * before + [(first, "F"), (second, "F")] * after
        zero_bubble = [(second, "I"), (second, "W"), (second, "F")] * before
        assert kinds[warm:warm + 3 * before] == zero_bubble
        steady = warm + 3 * before
        pairs = [(first, "F"), (second, "B"), (second, "F"), (first, "B")] * (m - 2 * ranks + after)
        assert kinds[steady:steady + len(pairs)] == pairs  # F&B overlapped: adjacent, F first
        # whole backwards in the middle, split ones (I, then W) at both ends; each micro-batch
        # of a stage in order, and every I followed later by its W
        for stage in (first, second):
            backs = [a for a in actions if a.stage == stage and a.kind in "BI"]
            assert [a.micro_batch for a in backs] == list(range(m))
            ws = [a.micro_batch for a in actions if a.stage == stage and a.kind == "W"]
            assert ws == [a.micro_batch for a in backs if a.kind == "I"]
        assert sum(a.kind == "I" for a in actions) == 2 * before + after


def test_dualpipe_v_mixes_whole_and_split_backwards_on_a_stage():
    s = dualpipe_v(2, 4)
    assert [a.text(True) for a in s.ranks[0] if a.stage == 3 and a.kind != "F"] == [
        "3I0", "3W0", "3B1", "3B2", "3B3"]
    assert s.splits_backward(3) and s.splits_backward(3, 0) and not s.splits_backward(3, 1)
    # stage 2's backward waits for stage 3's I where it split, its B where it did not
    assert dependencies(Action(2, "B", 0), s) == [Action(2, "F", 0), Action(3, "I", 0)]
    assert dependencies(Action(2, "B", 1), s) == [Action(2, "F", 1), Action(3, "B", 1)]


@pytest.mark.parametrize("args,fragment", [
    ((4, 3, 2), r"'dualpipe-v' on 2 devices needs at least 4 micro-batches \(2 per device\), "
                r"but 3 were asked for"),
    ((8, 7, 2), r"'dualpipe-v' on 4 devices needs at least 8 micro-batches .* use 8 or more, "
                r"or schedule 'zb-v'"),
    ((4, 8, 1), r"'dualpipe-v' places two stages on each rank in a V.*num_stages=4 with "
                r"chunks=1 .* num_stages=8 \(the model cut in 8 pieces on 4 devices\)"),
    ((5, 8, 2), r"num_stages=5 with chunks=2 .* num_stages=4 \(the model cut in 4 pieces on 2"),
])
def test_dualpipe_v_refuses_showing_the_grid_it_would_run(args: tuple, fragment: str):
    with pytest.raises(PipelineError, match=fragment) as error:
        dualpipe_v_stages(*args)
    assert "step   0" in str(error.value) and "rank0  0F0  0F1" in str(error.value)
    with pytest.raises(ValueError, match=fragment):  # a PipelineError is a ValueError
        get("dualpipe-v", *args[:2], chunks=args[2])


def test_zb_h1_has_only_split_backwards():
    s = zb_h1(3, 4)
    assert s.has_split_backward and all(s.splits_backward(k) for k in range(3))
    assert not any(a.kind == "B" for r in s.ranks for a in r)


@pytest.mark.parametrize("module,schedule", [
    ("gpipe", gpipe(3, 3)),
    ("one_f_one_b", one_f_one_b(3, 4)),
    ("interleaved", interleaved(2, 4, chunks=2)),
    ("interleaved_zb", interleaved_zb(2, 4, chunks=2)),
    ("zb_h1", zb_h1(3, 4)),
    ("looped_bfs", looped_bfs(2, 4, chunks=2)),
    ("zb_v", zb_v(2, 4)),
    ("dualpipe_v", dualpipe_v(2, 4)),
])
def test_module_docstring_shows_the_real_grid(module: str, schedule: Schedule):
    doc = importlib.import_module(f"tfpipe.schedules.{module}").__doc__
    assert textwrap.indent(format_schedule(schedule), "    ") in doc


# ----------------------------------------------------------------------------------------
# Action and schedule text parsing.

def test_action_text_forms():
    assert str(Action(2, "F", 3)) == "F3"
    assert Action(2, "F", 3).text(with_stage=True) == "2F3"
    assert Action.parse("2W13") == Action(2, "W", 13)
    assert Action.parse(" I0 ", stage=5) == Action(5, "I", 0)


@pytest.mark.parametrize("text,fragment", [
    ("X3", "Cannot parse action 'X3'"),
    ("F", "Cannot parse action 'F'"),
    ("F3", "names no stage"),
])
def test_action_parse_errors(text: str, fragment: str):
    with pytest.raises(ValueError, match=fragment):
        Action.parse(text)


def test_action_rejects_bad_fields():
    with pytest.raises(ValueError, match="Unknown action kind 'X'"):
        Action(0, "X", 0)
    with pytest.raises(ValueError, match=">= 0"):
        Action(-1, "F", 0)


def test_schedule_rejects_a_stage_on_two_ranks():
    with pytest.raises(ValueError, match="stage 0 has actions on rank 0 and rank 1"):
        Schedule.from_text(["F0 B0", "0F1 0B1"])


def test_rank_of_unknown_stage_names_the_known_stages():
    with pytest.raises(KeyError, match=r"no action for stage 7.*\[0, 1\]"):
        gpipe(2, 2).rank_of(7)


# ----------------------------------------------------------------------------------------
# Validation: each rule, with the grid and the offending action marked.

def assert_grid_error(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "step   0" in message and "rank0" in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_validate_duplicate_action():
    with pytest.raises(ScheduleError) as error:
        validate(Schedule.from_text(["F0 F0 B0", "F0 B0"]))
    assert_grid_error(error, "0F0 (stage 0) appears 2 times", ">F0<", "keep one")


def test_validate_missing_backward():
    with pytest.raises(ScheduleError) as error:
        validate(Schedule.from_text(["F0 F1 B0 B1", "F0 B0 F1"]))
    assert_grid_error(error, "stage 1 has no backward (B, or I and W) for micro-batch 1",
                      ">F1<", "add B1 after F1")


def test_validate_missing_forward():
    with pytest.raises(ScheduleError) as error:
        validate(Schedule.from_text(["F0 F1 B0 B1", "F0 B0 B1"]))
    assert_grid_error(error, "stage 1 never runs the forward F1", ">!B1!<")


def test_validate_backward_before_forward_on_its_rank():
    with pytest.raises(ScheduleError) as error:
        validate(Schedule.from_text(["F0 B0", "B0 F0"]))
    assert_grid_error(error, "1B0 comes before F0 of stage 1 on rank 1", ">!B0!<")


def test_validate_weight_grad_before_input_grad():
    with pytest.raises(ScheduleError) as error:
        validate(Schedule.from_text(["F0 I0 W0", "F0 W0 I0"]))
    assert_grid_error(error, "1W0 comes before I0 of stage 1 on rank 1", ">!W0!<")


def test_validate_input_grad_without_weight_grad():
    with pytest.raises(ScheduleError) as error:
        validate(Schedule.from_text(["F0 I0 W0", "F0 I0"]))
    assert_grid_error(error, "stage 1 splits the backward of micro-batch 0 into I and W but "
                      "has no W0", ">I0<")


def test_validate_both_full_and_split_backward():
    with pytest.raises(ScheduleError) as error:
        validate(Schedule.from_text(["F0 B0", "F0 B0 I0 W0"]))
    assert_grid_error(error, "stage 1 has both B0 and I0", ">B0<")


def test_validate_a_stage_may_split_some_backwards_and_not_others():
    """As DualPipeV does: stage 0's backward of micro-batch 1 waits for stage 1's I1."""
    mixed = validate(Schedule.from_text(["F0 F1 B0 B1", "F0 B0 F1 I1 W1"]))
    assert format_schedule(mixed) == grid("""
        step   0   1   2   3   4   5
        rank0  F0  F1  .   B0  .   B1
        rank1  .   F0  B0  F1  I1  W1
        """)
    with pytest.raises(ScheduleError) as error:  # but never both for one micro-batch
        validate(Schedule.from_text(["F0 B0", "F0 I0 B0 W0"]))
    assert_grid_error(error, "stage 1 has both B0 and I0", ">B0<")


def test_validate_action_outside_the_sizes():
    with pytest.raises(ScheduleError) as error:
        validate(Schedule.from_text(["F0 F5 B0 B5", "F0 B0"], num_micro_batches=2))
    assert_grid_error(error, "0F5 is outside 2 stages x 2 micro-batches", ">F5<")


def test_validate_deadlock_marks_the_blocked_actions():
    deadlocked = Schedule.from_text(["F0 B0 F1 B1", "F1 F0 B0 B1"], name="crossed")
    with pytest.raises(ScheduleError) as error:
        validate(deadlocked)
    assert str(error.value) == grid("""
        Schedule 'crossed' deadlocks: 0B0, 1F1 wait for each other (a stage's forward needs the previous stage's forward, its backward the next stage's backward). Reorder the actions.
        step   0
        rank0  F0    |     !B0!  F1    B1
        rank1  .     |     !F1!  F0    B0    B1
        (! marks actions waiting on an input that never comes: deadlock)
        """)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generated_schedules_validate(name: str):
    chunks = default_chunks(name)
    for k in (2, 4):
        for m in (1, 3, 8):
            if m < min_micro_batches(name, k):
                with pytest.raises(ValueError, match="needs at least"):
                    get(name, k * chunks, m, chunks=chunks)
                continue
            schedule = get(name, k * chunks, m, chunks=chunks)
            assert schedule.num_ranks == k


# ----------------------------------------------------------------------------------------
# Registry and `get`.

def test_registry_names():
    assert sorted(GENERATORS) == ["1f1b", "dualpipe-v", "gpipe", "interleaved",
                                  "interleaved-zb", "looped-bfs", "zb-h1", "zb-v"]
    assert {name: default_chunks(name) for name in GENERATORS} == {
        "gpipe": 1, "1f1b": 1, "interleaved": 2, "zb-h1": 1, "looped-bfs": 2, "zb-v": 2,
        "interleaved-zb": 2, "dualpipe-v": 2}
    assert FIXED_CHUNKS == {"zb-v", "dualpipe-v"}
    assert {name: min_micro_batches(name, 4) for name in GENERATORS if
            min_micro_batches(name, 4) > 1} == {"dualpipe-v": 8}


def test_get_keeps_the_two_size_form():
    assert get("gpipe", 3, 4) == gpipe(3, 4)
    assert get("1f1b", 3, 4) == one_f_one_b(3, 4)
    assert get("zb-h1", 3, 4) == zb_h1(3, 4)
    assert GENERATORS["gpipe"](3, 4) == gpipe(3, 4)


def test_get_interleaved_counts_virtual_stages():
    s = get("interleaved", 6, 6, chunks=3)
    assert s == interleaved(2, 6, chunks=3) == interleaved_stages(6, 6, chunks=3)
    assert get("interleaved", 4, 4).ranks == one_f_one_b(4, 4).ranks


def test_get_looped_bfs_counts_virtual_stages():
    assert get("looped-bfs", 6, 4, chunks=3) == looped_bfs(2, 4, chunks=3) \
        == looped_bfs_stages(6, 4, chunks=3)
    with pytest.raises(ValueError, match=r"Looped BFS schedule: num_stages=5 is not divisible "
                       r"by chunks=2.*4 or 6"):
        get("looped-bfs", 5, 4, chunks=2)


def test_get_interleaved_indivisible_stages_names_the_fix():
    with pytest.raises(ValueError, match=r"num_stages=5 is not divisible by chunks=2.*4 or 6"):
        get("interleaved", 5, 4, chunks=2)


def test_get_rejects_chunks_for_one_stage_per_rank_schedules():
    with pytest.raises(ValueError, match=r"'1f1b' runs one stage per rank.*'interleaved'"):
        get("1f1b", 4, 4, chunks=2)


def test_get_unknown_name():
    with pytest.raises(ValueError, match=r"Unknown schedule 'pipedream'.*'1f1b'"):
        get("pipedream", 2, 2)


def test_get_user_schedule_checks_its_size_and_rank_count():
    user = interleaved(2, 4, chunks=2)
    assert get(user, 4, 4) is user
    assert get(user, 4, 4, chunks=2) is user
    with pytest.raises(ValueError, match="is for 4 stages x 4 micro-batches"):
        get(user, 4, 8)
    with pytest.raises(ValueError, match="runs 4 stages on 2 ranks, but chunks=4"):
        get(user, 4, 4, chunks=4)


@pytest.mark.parametrize("args,fragment", [
    ((0, 4), "num_stages must be a positive integer, got 0"),
    ((2, 0), "num_micro_batches must be a positive integer, got 0"),
    ((2.0, 4), "num_stages must be a positive integer, got 2.0"),
    ((True, 4), "num_stages must be a positive integer, got True"),
])
def test_generators_reject_bad_sizes(args: tuple, fragment: str):
    for generate in (gpipe, one_f_one_b, zb_h1, interleaved, looped_bfs, zb_v, interleaved_zb,
                     dualpipe_v):
        with pytest.raises(ValueError, match=fragment):
            generate(*args)


def test_interleaved_rejects_bad_chunks():
    for generate in (interleaved, looped_bfs, interleaved_zb):
        with pytest.raises(ValueError, match="chunks must be a positive integer"):
            generate(2, 4, chunks=0)


# ----------------------------------------------------------------------------------------
# Costs errors.

def test_costs_per_stage_length_must_match():
    with pytest.raises(ValueError, match=r"Costs.forward has 2 per-stage values .* 3 stages"):
        simulate(gpipe(3, 2), Costs(forward=[1.0, 2.0], backward=2.0))


def test_costs_must_be_non_negative():
    with pytest.raises(ValueError, match=r"Costs.transfer must be finite and >= 0, got \[-1.0\]"):
        simulate(gpipe(2, 2), Costs(forward=1.0, backward=2.0, transfer=-1.0))


def test_simulate_validates_first():
    with pytest.raises(ScheduleError, match="no backward"):
        simulate(Schedule.from_text(["F0 B0", "F0"]), Costs(1.0, 2.0))


# ----------------------------------------------------------------------------------------
# Pure data: no TensorFlow, Keras or module-level matplotlib anywhere in the package.

def test_no_framework_imports_in_source():
    for path in sorted(SCHEDULES_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                root = name.split(".")[0]
                assert root not in ("tensorflow", "keras", "tf_keras"), f"{path.name}: {name}"
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                assert not (module or "").startswith("matplotlib"), f"{path.name}: {module}"


def test_package_imports_without_tensorflow_keras_or_matplotlib():
    # Load tfpipe.schedules under an empty `tfpipe` package so that tfpipe/__init__.py (which
    # is allowed to import TensorFlow) does not run.
    code = textwrap.dedent(f"""
        import sys, types
        pkg = types.ModuleType("tfpipe")
        pkg.__path__ = [{str(ROOT / "tfpipe")!r}]
        sys.modules["tfpipe"] = pkg
        import tfpipe.schedules as s
        s.simulate(s.get("zb-h1", 3, 4), s.Costs(1.0, 2.0))
        bad = sorted(m for m in sys.modules
                     if m.split(".")[0] in ("tensorflow", "keras", "matplotlib"))
        assert not bad, bad
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("module", sorted(
    p.stem for p in SCHEDULES_DIR.glob("*.py") if p.stem != "__init__"
) + ["__init__"])
def test_docstring_examples(module: str):
    name = "tfpipe.schedules" + ("" if module == "__init__" else f".{module}")
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
