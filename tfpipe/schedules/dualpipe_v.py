"""DualPipeV (DeepSeek-V3's DualPipe cut in half): two chunks per rank in a V, F&B overlapped.

The order of PyTorch's `ScheduleDualPipeV`, itself that of DeepSeek's `DualPipeV`
(github.com/deepseek-ai/DualPipe, `dualpipev.py`; Sea AI Lab's "cut-in-half" of the
DeepSeek-V3 report's DualPipe). The model is cut into 2D stages for D ranks, placed in a V as
for `zb-v`: rank r holds stage r (its first) and stage 2D - 1 - r (its second), so rank 0
holds the first stage and the last (the loss). Most backwards run whole (`B`); those that
would leave a rank idle are split into `I` and `W` and the `W`s run later, oldest first. Rank r
runs, with M >= 2D micro-batches:

1. 2(D - r - 1) forwards of its first stage, then r + 1 pairs: first stage's F, second's F;
2. D - r - 1 rounds of `I W F` of its second stage (zero bubble: `W` right after its `I`);
3. M - 2D + r + 1 rounds of two overlapped pairs, F of the first stage with B of the second,
   then F of the second with B of the first;
4. D - r - 1 rounds: B of the second stage, then F of the second with B of the first;
5. r + 1 rounds: a backward of the second stage, then of the first, whole in the first half
   of the rounds and split (`I`) from round (r + 1) // 2 on (from its second stage's on odd
   ranks, from its first stage's on even ranks);
6. D - r - 1 rounds: the oldest pending `W`, then `I` of the first stage; then the `W`s left.

An overlapped pair (PyTorch's `OVERLAP_F_B`) is the two actions next to each other in the
rank's list, forward first: they share no data, so TensorFlow's dataflow may run them at the
same time, and the forward after the pair waits for the pair's backward (the executor's one
wait per forward, `executor.program.rank_waits`). The clock, the grid and the simulator run
the two one after the other. Unit-time actions give this grid (D=2, M=4; stage in front):

    step   0    1    2    3    4    5    6    7    8    9    10   11   12   13   14   15   16   17   18
    rank0  0F0  0F1  0F2  3F0  3I0  3W0  3F1  0F3  3B1  3F2  0B0  3B2  3F3  0B1  3B3  0I2  0W2  0I3  0W3
    rank1  .    1F0  2F0  1F1  2F1  1F2  2B0  2F2  1B0  1F3  2B1  2F3  1B1  2B2  1B2  2I3  1I3  2W3  1W3

Figures (simulator, a chunk's F, I and W equally long, f each, B = 2f, no transfer delay):
for M >= 2D the step is 6 M f + (D - 1) f, ZB-V's: a bubble of (D-1)/(6M+D-1) (D=4, M=8:
3/51 = 0.059, against 1F1B's 0.273 on the same 4 devices). The DualPipe README gives
(PP/2 - 1)(F&B + B - 3W) per device; with F&B = F + B (no overlap) that is 2(D - 1) f, twice
what the simulator finds here. Memory: stage s holds at most 2D - s micro-batches (ZB-V's),
a rank at most 2D + 1 chunk activations (the README's PP + 1; ZB-V: 2D), the one more
being the forward of an overlapped pair beside its backward. It runs fewer split backwards
than ZB-V (whose every backward is split), which shortens its step wherever a `W` costs more
than half a backward (docs/schedules.md, "Known costs and limits"). M < 2D is refused, as
PyTorch and DeepSeek do; `zb-v` runs any M.
"""  # noqa: E501 (the grid is wider than a line)

from __future__ import annotations

from collections import deque

from tfpipe.errors import PipelineError
from tfpipe.schedules.actions import Action, Schedule, check_sizes
from tfpipe.schedules.format import format_schedule
from tfpipe.schedules.zb_v import v_num_ranks


def dualpipe_v(num_ranks: int, num_micro_batches: int) -> Schedule:
    """The DualPipeV schedule (PyTorch's `ScheduleDualPipeV`, DeepSeek's `DualPipeV`).

    Args:
        num_ranks: D >= 1, the number of devices; the model is cut into 2D stages.
        num_micro_batches: M >= 2D.

    Returns:
        A `Schedule` named `"dualpipe-v"` with `num_stages = 2 * D`, of `F`, `B`, `I` and `W`
        actions (a stage runs some backwards whole and others split); `schedule.rank_of(s)`
        is `s` for `s < D` and `2D - 1 - s` after. An overlapped forward and backward are
        adjacent in a rank's list, the forward first.

    Raises:
        ValueError: if D or M is not a positive integer.
        PipelineError: if M < 2D; the message shows the grid for M = 2D.

    Example:
        >>> dualpipe_v(1, 2).to_text()
        ['0F0 1F0 0F1 1B0 1F1 0B0 1B1 0I1 0W1']
    """
    check_sizes(num_ranks, num_micro_batches)
    least = 2 * num_ranks
    if num_micro_batches < least:
        example = format_schedule(dualpipe_v(num_ranks, least))
        raise PipelineError(
            f"Schedule 'dualpipe-v' on {num_ranks} devices needs at least {least} "
            f"micro-batches (2 per device), but {num_micro_batches} were asked for: use "
            f"{least} or more, or schedule 'zb-v', which runs any count. With {least} it "
            f"runs:\n{example}"
        )
    ranks = tuple(
        tuple(_rank_order(r, num_ranks, num_micro_batches)) for r in range(num_ranks)
    )
    return Schedule("dualpipe-v", 2 * num_ranks, num_micro_batches, ranks)


def _rank_order(rank: int, num_ranks: int, num_micro_batches: int) -> list[Action]:
    """Rank `rank`'s actions, in the numbered phases of the module docstring."""
    first, second = rank, 2 * num_ranks - 1 - rank
    before, after = num_ranks - rank - 1, rank + 1  # ranks below this one, and this + above
    order: list[Action] = []
    done = {(s, k): 0 for s in (first, second) for k in "FB"}  # next micro-batch: F, backward
    pending: deque[Action] = deque()  # the `W`s of the `I`s run so far, oldest first

    def run(stage: int, kind: str) -> None:
        key = (stage, "F" if kind == "F" else "B")
        order.append(Action(stage, kind, done[key]))
        if kind == "I":
            pending.append(Action(stage, "W", done[key]))
        done[key] += 1

    for _ in range(2 * before):
        run(first, "F")
    for _ in range(after):
        run(first, "F")
        run(second, "F")
    for _ in range(before):
        run(second, "I")
        order.append(pending.popleft())
        run(second, "F")
    for _ in range(num_micro_batches - 2 * num_ranks + after):
        for forward, backward in ((first, second), (second, first)):
            run(forward, "F")
            run(backward, "B")
    for _ in range(before):
        run(second, "B")
        run(second, "F")
        run(first, "B")
    half = after // 2
    for i in range(after):
        run(second, "I" if i > half or (i == half and rank % 2) else "B")
        run(first, "I" if i >= half else "B")
    for _ in range(before):
        order.append(pending.popleft())
        run(first, "I")
    order.extend(pending)
    return order


def dualpipe_v_stages(num_stages: int, num_micro_batches: int, chunks: int = 1) -> Schedule:
    """Registry form of `dualpipe_v`: sized by stages; DualPipeV always holds 2 per rank.

    Args:
        num_stages: K, the number of model pieces, even: the schedule runs on K / 2 ranks.
        num_micro_batches: M >= K (two per device).
        chunks: must be 2 (the V places two stages on each rank).

    Returns:
        `dualpipe_v(num_stages // 2, num_micro_batches)`.

    Raises:
        ValueError: if K or M is not a positive integer.
        PipelineError: for `chunks` other than 2, an odd `num_stages` or M < K; the message
            shows the grid DualPipeV would run for the nearest valid size.

    Example:
        >>> dualpipe_v_stages(4, 4, chunks=2).num_ranks
        2
    """
    check_sizes(num_stages, num_micro_batches)
    ranks = v_num_ranks(
        "dualpipe-v", num_stages, chunks,
        lambda d: dualpipe_v(d, max(num_micro_batches, 2 * d)),
    )
    return dualpipe_v(ranks, num_micro_batches)
