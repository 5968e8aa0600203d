"""Interleaved 1F1B (Megatron-LM, Narayanan et al. 2021): v model chunks per rank, bubble / v.

The model is cut into K = D * v virtual stages for D ranks; rank r holds stages
r, r + D, ..., r + (v - 1) * D, so a micro-batch visits every rank v times. Each rank walks
its forwards in groups of D micro-batches, chunk 0 of the group first, then chunk 1, and so
on; backwards walk the same table with the chunks reversed. Rank r runs
`2 * (D - r - 1) + (v - 1) * D` warm-up forwards, then alternates one forward and one
backward, then drains the backwards. Unit-time actions give this grid (D=2, v=2, M=4; the
stage is written in front, `2F1` is stage 2's forward of micro-batch 1):

    step   0    1    2    3    4    5    6    7    8    9    10   11   12   13   14   15   16   17
    rank0  0F0  0F1  2F0  2F1  0F2  2B0  0F3  2B1  2F2  0B0  2F3  0B1  .    2B2  .    2B3  0B2  0B3
    rank1  .    1F0  1F1  3F0  3B0  3F1  3B1  1F2  1B0  1F3  1B1  3F2  3B2  3F3  3B3  1B2  1B3  .

Why this order: a chunk costs 1/v of a stage, so filling and draining the pipeline costs
1/v as much. With per-chunk costs f and b (a whole rank's forward F = v f, backward
B = v b) and no transfer delay, the step takes (F + B) * (max(M, D) + (min(M, D) - 1) / v),
which for M >= D is a bubble of (D-1)/(v M + D - 1) against 1F1B's (D-1)/(M + D - 1). The
groups of D keep the pipeline fed: chunk c + 1 of a micro-batch needs chunk c to have crossed
all D ranks, which the other D - 1 micro-batches of the group cover. When D does not divide
M the last group also takes the remainder (group sizes D, ..., D, D + M % D) and the warm-up
grows to `2 * (D - r - 1) + (v - 1) * (D + M % D)`, which keeps the same step time; M < D
leaves one group and an unavoidable wait. The factor 2 in the warm-up is Megatron-LM's: one
forward more per downstream rank than the dependency-minimal order, so that a transfer delay
between ranks does not stall every steady-state step (with zero transfer both orders give
the same step time). The price is memory: after its warm-up rank r holds warm-up + 1 chunk
activations, each 1/v of a stage's; for rank 0 with D | M that is D + (D - 1) / v stages'
worth against 1F1B's D.
"""

from __future__ import annotations

from collections.abc import Callable

from tfpipe.schedules.actions import Action, Schedule, check_sizes
from tfpipe.schedules.one_f_one_b import one_f_one_b


def interleaved(num_ranks: int, num_micro_batches: int, chunks: int = 2) -> Schedule:
    """The interleaved 1F1B schedule of Megatron-LM.

    Args:
        num_ranks: D >= 1, the number of devices.
        num_micro_batches: M >= 1. Any M works; the bubble has its closed form for M >= D.
        chunks: v >= 1, model chunks (virtual stages) per rank. `chunks=1` is exactly
            `one_f_one_b(num_ranks, num_micro_batches)`.

    Returns:
        A `Schedule` with `num_stages = D * v` virtual stages; rank r runs stages
        `r, r + D, ..., r + (v - 1) * D`, so `schedule.rank_of(stage) == stage % D`.

    Raises:
        ValueError: if D, M or v is not a positive integer.

    Example:
        >>> interleaved(2, 2, chunks=2).to_text()
        ['0F0 0F1 2F0 2F1 2B0 2B1 0B0 0B1', '1F0 1F1 3F0 3B0 3F1 3B1 1B0 1B1']
    """
    check_sizes(num_ranks, num_micro_batches)
    check_chunks(chunks)
    if chunks == 1:
        return one_f_one_b(num_ranks, num_micro_batches)
    ranks = tuple(_rank_order(r, num_ranks, num_micro_batches, chunks) for r in range(num_ranks))
    return Schedule("interleaved", num_ranks * chunks, num_micro_batches, ranks)


def interleaved_stages(num_stages: int, num_micro_batches: int, chunks: int = 1) -> Schedule:
    """Registry form of `interleaved`: sized by virtual stages rather than by ranks.

    Args:
        num_stages: K, the number of model pieces (virtual stages), a multiple of `chunks`.
        num_micro_batches: M >= 1.
        chunks: v, stages per rank; the schedule runs on `K // v` ranks.

    Returns:
        `interleaved(num_stages // chunks, num_micro_batches, chunks)`.

    Raises:
        ValueError: if `num_stages` is not a positive multiple of `chunks`.

    Example:
        >>> interleaved_stages(4, 2, chunks=2).num_ranks
        2
    """
    return interleaved(num_ranks_for("Interleaved", num_stages, num_micro_batches, chunks),
                       num_micro_batches, chunks)


def by_stages(
    label: str, generator: Callable[[int, int, int], Schedule]
) -> Callable[..., Schedule]:
    """The registry form of `generator(num_ranks, num_micro_batches, chunks)`: sized by
    virtual stages, `(num_stages, num_micro_batches, chunks=1)`, run on `num_stages // chunks`
    ranks (`num_ranks_for` checks the sizes; `label` names the schedule in its errors).

    Example:
        >>> from tfpipe.schedules.looped_bfs import looped_bfs
        >>> by_stages("Looped BFS", looped_bfs)(6, 4, chunks=3).num_ranks
        2
    """

    def generate(num_stages: int, num_micro_batches: int, chunks: int = 1) -> Schedule:
        num_ranks = num_ranks_for(label, num_stages, num_micro_batches, chunks)
        return generator(num_ranks, num_micro_batches, chunks)

    generate.__name__ = f"{generator.__name__}_stages"
    generate.__doc__ = (f"Registry form of `{generator.__name__}`, sized by virtual stages "
                        f"(`tfpipe.schedules.interleaved.by_stages`).")
    return generate


def num_ranks_for(label: str, num_stages: int, num_micro_batches: int, chunks: int) -> int:
    """`num_stages // chunks`, after checking the sizes and that `chunks` divides `num_stages`.

    Shared by the schedules that deal several stages to each rank (`interleaved`,
    `looped-bfs`); `label` names the schedule in the error.

    Raises:
        ValueError: for a size or `chunks` that is not a positive integer, or a `num_stages`
            that is not a multiple of `chunks` (naming the nearest multiples).
    """
    check_sizes(num_stages, num_micro_batches)
    check_chunks(chunks)
    if num_stages % chunks:
        lower = num_stages - num_stages % chunks
        fixes = ([f"{lower}"] if lower else []) + [f"{lower + chunks}"]
        raise ValueError(
            f"{label} schedule: num_stages={num_stages} is not divisible by "
            f"chunks={chunks}, so the stages cannot be dealt evenly to ranks. Partition the "
            f"model into a multiple of {chunks} stages (for example {' or '.join(fixes)}), "
            f"or pick a chunks value that divides {num_stages}."
        )
    return num_stages // chunks


def check_chunks(chunks: int) -> None:
    """Raises a `ValueError` unless `chunks` is a positive integer (bools rejected)."""
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(
            f"chunks must be a positive integer (model chunks per rank), got {chunks!r}."
        )


def _groups(num_ranks: int, num_micro_batches: int) -> list[range]:
    """Micro-batches in groups of D; the last group also takes the remainder (M % D)."""
    count = max(1, num_micro_batches // num_ranks)
    starts = [g * num_ranks for g in range(count)] + [num_micro_batches]
    return [range(a, b) for a, b in zip(starts, starts[1:])]


def _rank_order(
    rank: int, num_ranks: int, num_micro_batches: int, chunks: int
) -> tuple[Action, ...]:
    groups = _groups(num_ranks, num_micro_batches)
    table = [(m, c) for group in groups for c in range(chunks) for m in group]
    forwards = [Action(c * num_ranks + rank, "F", m) for m, c in table]
    backwards = [Action((chunks - 1 - c) * num_ranks + rank, "B", m) for m, c in table]
    total = len(table)
    largest = max(len(g) for g in groups)
    warmup = min(2 * (num_ranks - rank - 1) + (chunks - 1) * largest, total)
    order = forwards[:warmup]
    for i in range(total - warmup):
        order += [forwards[warmup + i], backwards[i]]
    order += backwards[total - warmup :]
    return tuple(order)
