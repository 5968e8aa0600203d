"""Looped BFS (Lamy-Poirier 2023, "Breadth-First Pipeline Parallelism"): GPipe looped over chunks.

The model is cut into K = D * v virtual stages for D ranks, dealt out as for `interleaved`:
rank r holds stages r, r + D, ..., r + (v - 1) * D. Each rank runs breadth-first: the
forwards of all M micro-batches of its first stage, then all of its next stage, and so on;
then the backwards, last stage first, each stage's micro-batches in reverse order (PyTorch's
`ScheduleLoopedBFS` order: the micro-batch whose forward ran last is taken back first).
Unit-time actions give this grid (D=2, v=2, M=4; the stage is written in front):

    step   0    1    2    3    4    5    6    7    8    9    10   11   12   13   14   15   16   17
    rank0  0F0  0F1  0F2  0F3  2F0  2F1  2F2  2F3  .    .    2B3  2B2  2B1  2B0  0B3  0B2  0B1  0B0
    rank1  .    1F0  1F1  1F2  1F3  3F0  3F1  3F2  3F3  3B3  3B2  3B1  3B0  1B3  1B2  1B1  1B0  .

Why this order: it is GPipe looped over the v chunks. Each chunk costs 1/v of a stage, so the
fill and the drain cost 1/v of GPipe's: with per-chunk costs f and b (a rank's whole forward
F = v f and backward B = v b) and no transfer delay, the step takes
(F + B) * (M + (D - 1) / v) for M >= D, a bubble of (D-1)/(v M + D - 1), the same as
interleaved 1F1B. For M < D a micro-batch comes back to rank 0 for its next chunk before the
rank has finished the chunk before, and the step is (F + B) * (D + (M - 1) / v), as for
interleaved. What it does not have is 1F1B's memory bound: like GPipe, every stage holds all
M micro-batches at the turn from forward to backward, so a rank holds v * M chunk
activations (M stages' worth) against interleaved's about D + (D - 1) / v. It suits a
data-parallel setting that shards parameters (FSDP): a rank finishes each chunk's forwards,
and later its backwards, in one run, so a chunk's weights are gathered once per step.
"""

from __future__ import annotations

from tfpipe.schedules.actions import Action, Schedule, check_sizes
from tfpipe.schedules.interleaved import by_stages, check_chunks


def looped_bfs(num_ranks: int, num_micro_batches: int, chunks: int = 2) -> Schedule:
    """The Looped BFS schedule (PyTorch's `ScheduleLoopedBFS`).

    Args:
        num_ranks: D >= 1, the number of devices.
        num_micro_batches: M >= 1.
        chunks: v >= 1, model chunks (virtual stages) per rank. With `chunks=1` it is GPipe
            with each stage's backwards in reverse micro-batch order.

    Returns:
        A `Schedule` named `"looped-bfs"` with `num_stages = D * v` virtual stages; rank r
        runs stages `r, r + D, ..., r + (v - 1) * D`, so `schedule.rank_of(stage) ==
        stage % D`.

    Raises:
        ValueError: if D, M or v is not a positive integer.

    Example:
        >>> looped_bfs(2, 2, chunks=2).to_text()
        ['0F0 0F1 2F0 2F1 2B1 2B0 0B1 0B0', '1F0 1F1 3F0 3F1 3B1 3B0 1B1 1B0']
    """
    check_sizes(num_ranks, num_micro_batches)
    check_chunks(chunks)
    micro_batches = range(num_micro_batches)
    ranks = []
    for r in range(num_ranks):
        own = [c * num_ranks + r for c in range(chunks)]
        forwards = [Action(s, "F", m) for s in own for m in micro_batches]
        backwards = [Action(s, "B", m) for s in reversed(own) for m in reversed(micro_batches)]
        ranks.append(tuple(forwards + backwards))
    return Schedule("looped-bfs", num_ranks * chunks, num_micro_batches, tuple(ranks))


looped_bfs_stages = by_stages("Looped BFS", looped_bfs)
"""`looped_bfs` sized by virtual stages (the registry form)."""
