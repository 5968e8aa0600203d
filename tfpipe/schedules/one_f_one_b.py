"""1F1B (PipeDream-Flush): warm up with a few forwards, then alternate one forward, one backward.

With K stages and M micro-batches, rank s runs `min(K - s - 1, M)` warm-up forwards, then
alternates one forward and one backward until the forwards run out, then drains the remaining
backwards. Unit-time actions give this grid (K=3, M=4):

    step   0   1   2   3   4   5   6   7   8   9   10  11
    rank0  F0  F1  F2  .   .   B0  F3  B1  .   B2  .   B3
    rank1  .   F0  F1  .   B0  F2  B1  F3  B2  .   B3  .
    rank2  .   .   F0  B0  F1  B1  F2  B2  F3  B3  .   .

Why this order: the step time is GPipe's (with equal stage costs F and B and no transfer
delay, (M + K - 1)(F + B): a bubble of (K-1)/(M+K-1)), but stage s never holds more than
`K - s` micro-batches' activations instead of all M, because each backward frees one
micro-batch before the next forward starts. That bound is what lets M grow to shrink the
bubble without running out of memory.
"""

from __future__ import annotations

from tfpipe.schedules.actions import Action, Schedule, check_sizes


def one_f_one_b(num_stages: int, num_micro_batches: int) -> Schedule:
    """The 1F1B (PipeDream-Flush) schedule.

    Args:
        num_stages: K >= 1, one stage per rank.
        num_micro_batches: M >= 1.

    Returns:
        A `Schedule` in which rank s runs `w = min(K - s - 1, M)` forwards, then `M - w`
        pairs (forward of micro-batch `w + i`, backward of micro-batch `i`), then the last
        `w` backwards. At most `min(K - s, M)` micro-batches are in flight on stage s.

    Raises:
        ValueError: if K or M is not a positive integer.

    Example:
        >>> one_f_one_b(2, 3).to_text()
        ['F0 F1 B0 F2 B1 B2', 'F0 B0 F1 B1 F2 B2']
    """
    check_sizes(num_stages, num_micro_batches)
    ranks = tuple(_rank_order(s, num_stages, num_micro_batches) for s in range(num_stages))
    return Schedule("1f1b", num_stages, num_micro_batches, ranks)


def _rank_order(stage: int, num_stages: int, num_micro_batches: int) -> tuple[Action, ...]:
    warmup = min(num_stages - stage - 1, num_micro_batches)
    order = [Action(stage, "F", m) for m in range(warmup)]
    for i in range(num_micro_batches - warmup):
        order += [Action(stage, "F", warmup + i), Action(stage, "B", i)]
    order += [Action(stage, "B", m) for m in range(num_micro_batches - warmup, num_micro_batches)]
    return tuple(order)
