"""ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): 1F1B with W deferred into bubbles.

The backward of each stage is split into `I` (gradient with respect to the stage input, which
the previous stage waits for) and `W` (gradient with respect to the weights, which nobody
waits for). Rank s runs 1F1B's `min(K - s - 1, M)` warm-up forwards, then alternates `F` and
`I`, but keeps up to s weight gradients pending: a `W` runs only once more than s are
pending, and the last s run at the end. Unit-time actions give this grid (K=3, M=4):

    step   0   1   2   3   4   5   6   7   8   9   10  11  12  13
    rank0  F0  F1  F2  .   .   I0  W0  F3  I1  W1  I2  W2  I3  W3
    rank1  .   F0  F1  .   I0  F2  I1  W0  F3  I2  W1  I3  W2  W3
    rank2  .   .   F0  I0  F1  I1  F2  I2  W0  F3  I3  W1  W2  W3

Why this order: the gradient now crosses each stage in the time of an `I` instead of a full
`B`, so the start-up wait of the early ranks shrinks, and the pending `W`s of the late ranks
fill their end-of-step idle time. With costs F = I = W (backward = 2 forwards) the step takes
max(3M + K - 1, 2M + 2K - 1) forward-times instead of 1F1B's 3(M + K - 1): for M >= K the
bubble is (K-1)/(3M+K-1), about a third of 1F1B's. Counting a micro-batch in flight on a
stage from its `F` to its `W`, every stage peaks at min(K, M): the same peak as 1F1B's
busiest stage (stage 0), the later stages spending their 1F1B headroom (K - s) on the pending
`W`s. This is the paper's ZB-H1 (same peak memory as 1F1B); ZB-H2 and ZB-V trade more
memory for a smaller bubble and are not implemented here.
"""

from __future__ import annotations

from collections import deque

from tfpipe.schedules.actions import Action, Schedule, check_sizes


def zb_h1(num_stages: int, num_micro_batches: int) -> Schedule:
    """The ZB-H1 zero-bubble schedule: 1F1B order, split backward, deferred weight gradients.

    Args:
        num_stages: K >= 1, one stage per rank.
        num_micro_batches: M >= 1.

    Returns:
        A `Schedule` of `F`, `I` and `W` actions (no `B`). Rank s runs
        `w = min(K - s - 1, M)` forwards, then for each remaining micro-batch an `F` and the
        next `I`, then the remaining `I`s; after each `I` it runs the oldest pending `W` once
        more than s are pending, and the pending `W`s at the end.

    Raises:
        ValueError: if K or M is not a positive integer.

    Example:
        >>> zb_h1(2, 3).to_text()
        ['F0 F1 I0 W0 F2 I1 W1 I2 W2', 'F0 I0 F1 I1 W0 F2 I2 W1 W2']
    """
    check_sizes(num_stages, num_micro_batches)
    ranks = tuple(_rank_order(s, num_stages, num_micro_batches) for s in range(num_stages))
    return Schedule("zb-h1", num_stages, num_micro_batches, ranks)


def _rank_order(stage: int, num_stages: int, num_micro_batches: int) -> tuple[Action, ...]:
    warmup = min(num_stages - stage - 1, num_micro_batches)
    order = [Action(stage, "F", m) for m in range(warmup)]
    pending: deque[int] = deque()  # micro-batches whose I ran and whose W has not

    def backward(m: int) -> None:
        order.append(Action(stage, "I", m))
        pending.append(m)
        if len(pending) > stage:
            order.append(Action(stage, "W", pending.popleft()))

    for i in range(num_micro_batches - warmup):
        order.append(Action(stage, "F", warmup + i))
        backward(i)
    for m in range(num_micro_batches - warmup, num_micro_batches):
        backward(m)
    order += [Action(stage, "W", m) for m in pending]
    return tuple(order)
