"""ZB-V (Qi et al. 2024, zero bubble in a V): two chunks per rank, split backward, 1F1B's memory.

From "Zero Bubble Pipeline Parallelism" (section 6) and "Pipeline Parallelism with
Controllable Memory" (Qi et al. 2024), in the order of PyTorch's `ScheduleZBVZeroBubble`. The
model is cut into 2D stages for D ranks, placed in a V: stage s runs on rank s for s < D and
on rank 2D - 1 - s after, so rank r holds stages r and 2D - 1 - r, and rank 0 holds both the
first stage and the last (the loss). A micro-batch goes down the ranks and back up; the turn
at the bottom and the loss at the top cost no transfer. The backward is split into `I` and
`W` as in ZB-H1. Rank r warms up with `2(D - r) - 1` forwards of its first stage, then `r`
pairs of forwards (second stage, first stage), then `D - r` rounds of `F I W` of its second
stage; the steady state runs `F I W` of the first stage, then of the second; the cool-down
runs the remaining `I`s, the first stage's `W`s behind them, then the `W`s left. Unit-time
actions give this grid (D=2, M=4; the stage is written in front):

    step   0    1    2    3    4    5    6    7    8    9    10   11   12   13   14   15   16   17   18   19   20   21   22   23   24
    rank0  0F0  0F1  0F2  3F0  3I0  3W0  3F1  3I1  3W1  0F3  0I0  0W0  3F2  3I2  3W2  0I1  0W1  3F3  3I3  3W3  0I2  0W2  0I3  0W3  .
    rank1  .    1F0  2F0  1F1  2F1  2I0  2W0  1F2  1I0  1W0  2F2  2I1  2W1  1F3  1I1  1W1  2F3  2I2  2W2  1I2  2I3  1I3  1W2  2W3  1W3

Why this order: with a chunk's `F`, `I` and `W` equally long (f each: a stage's forward
F = 2f, backward B = 4f) and M >= 2D - 1, the only idle time is the start-up that no
schedule avoids (rank r cannot start before the first micro-batch's r forwards):
the step is 6 M f + (D - 1) f, a bubble of (D-1)/(6M+D-1), against ZB-H1's (D-1)/(3M+D-1)
and 1F1B's (D-1)/(M+D-1) on the same D devices (the papers' "zero bubble", which does not
count the start-up). Rank r holds at most min(2D, 2M, M + r + 1) chunk activations, each
half a stage's, so the busiest holds min(D, M) stages' worth: 1F1B's peak (its stage 0),
and every rank about the same. The price is twice 1F1B's transfers (each micro-batch
crosses the devices twice) and a model cut into 2D pieces. For M < 2D - 1 the order is
built for 2D - 1 micro-batches and the actions of the missing ones are left out, as PyTorch
does.
"""  # noqa: E501 (the grid is wider than a line)

from __future__ import annotations

from collections.abc import Callable

from tfpipe.errors import PipelineError
from tfpipe.schedules.actions import Action, Schedule, check_sizes
from tfpipe.schedules.format import format_schedule


def zb_v(num_ranks: int, num_micro_batches: int) -> Schedule:
    """The ZB-V zero-bubble schedule (PyTorch's `ScheduleZBVZeroBubble`).

    Args:
        num_ranks: D >= 1, the number of devices; the model is cut into 2D stages.
        num_micro_batches: M >= 1. The order is built for max(M, 2D - 1) micro-batches and
            the actions of micro-batches M and above are left out, as PyTorch does.

    Returns:
        A `Schedule` named `"zb-v"` with `num_stages = 2 * D`, of `F`, `I` and `W` actions;
        `schedule.rank_of(s)` is `s` for `s < D` and `2D - 1 - s` after.

    Raises:
        ValueError: if D or M is not a positive integer.

    Example:
        >>> zb_v(1, 2).to_text()
        ['0F0 1F0 1I0 1W0 0F1 0I0 0W0 1F1 1I1 1W1 0I1 0W1']
    """
    check_sizes(num_ranks, num_micro_batches)
    ranks = tuple(
        tuple(a for a in _rank_order(r, num_ranks, num_micro_batches)
              if a.micro_batch < num_micro_batches)
        for r in range(num_ranks)
    )
    return Schedule("zb-v", 2 * num_ranks, num_micro_batches, ranks)


def _rank_order(rank: int, num_ranks: int, num_micro_batches: int) -> list[Action]:
    total = max(num_micro_batches, 2 * num_ranks - 1)
    first, second = rank, 2 * num_ranks - 1 - rank
    order: list[Action] = []
    done = {(s, k): 0 for s in (first, second) for k in "FIW"}  # next micro-batch per kind

    def run(stage: int, kind: str) -> None:
        order.append(Action(stage, kind, done[(stage, kind)]))
        done[(stage, kind)] += 1

    for _ in range(2 * (num_ranks - rank) - 1):
        run(first, "F")
    for _ in range(rank):
        run(second, "F")
        run(first, "F")
    for _ in range(num_ranks - rank):
        for kind in "FIW":
            run(second, kind)
    while done[(second, "F")] < done[(first, "F")] or done[(first, "F")] < total:
        if done[(first, "F")] < total:
            run(first, "F")
        run(first, "I")
        run(first, "W")
        for kind in "FIW":
            run(second, kind)
    for _ in range(rank):
        run(first, "I")
        run(second, "I")
    for _ in range(num_ranks - rank):
        run(first, "I")
        run(first, "W")
    for stage in (second, first):
        while done[(stage, "W")] < done[(stage, "I")]:
            run(stage, "W")
    return order


def zb_v_stages(num_stages: int, num_micro_batches: int, chunks: int = 1) -> Schedule:
    """Registry form of `zb_v`: sized by stages; ZB-V always holds 2 per rank.

    Args:
        num_stages: K, the number of model pieces, even: the schedule runs on K / 2 ranks.
        num_micro_batches: M >= 1.
        chunks: must be 2 (the V places two stages on each rank).

    Returns:
        `zb_v(num_stages // 2, num_micro_batches)`.

    Raises:
        ValueError: for a size that is not a positive integer; a `PipelineError` (a
            `ValueError`) for `chunks` other than 2 or an odd `num_stages`, the message
            showing the grid ZB-V would run for the nearest valid size.

    Example:
        >>> zb_v_stages(4, 4, chunks=2).num_ranks
        2
    """
    check_sizes(num_stages, num_micro_batches)
    ranks = v_num_ranks("zb-v", num_stages, chunks, lambda d: zb_v(d, num_micro_batches))
    return zb_v(ranks, num_micro_batches)


def v_num_ranks(
    name: str, num_stages: int, chunks: int, example: Callable[[int], Schedule]
) -> int:
    """`num_stages // 2` for a schedule placed in a V (`zb-v`, `dualpipe-v`), after checking
    that `chunks` is 2 and `num_stages` even.

    Args:
        name: the schedule's name, for the message.
        num_stages: K, the model pieces asked for.
        chunks: the stages per rank asked for.
        example: the schedule on D ranks, whose grid the message shows for the nearest D.

    Raises:
        PipelineError: for `chunks` other than 2 or an odd `num_stages`.
    """
    if chunks != 2 or num_stages % 2:
        ranks = max(1, num_stages // 2) if chunks == 2 else num_stages
        raise PipelineError(
            f"Schedule {name!r} places two stages on each rank in a V (stage s on rank s, "
            f"and stage 2D-1-s on rank s too), but num_stages={num_stages} with "
            f"chunks={chunks!r} was asked for: use chunks=2 and an even num_stages, for "
            f"example num_stages={2 * ranks} (the model cut in {2 * ranks} pieces on {ranks} "
            f"devices), which runs:\n{format_schedule(example(ranks))}"
        )
    return num_stages // 2
