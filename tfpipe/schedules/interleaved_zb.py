"""Interleaved zero bubble (Qi et al.): interleaved 1F1B with the backward split, W in bubbles.

The idea of PyTorch's `ScheduleInterleavedZeroBubble`, on tfpipe's interleaved order. The
stages are placed as for `interleaved` (D ranks, v chunks: rank r holds stages r, r + D, ...,
r + (v - 1) * D) and each rank runs interleaved 1F1B's forwards and backwards in
interleaved's order, with every backward `B` split into `I` (the input gradient, which the
previous stage waits for) and `W` (the weight gradient, which nobody waits for), as in
ZB-H1. The `W`s are placed by running the order with unit-time actions: a rank runs its next
`F` or `I` as soon as its inputs are there; while it waits it runs its oldest pending `W`
(filling the bubble), and it runs one before an `F` that would otherwise hold more
micro-batches on that stage, or more chunk activations on that rank, than interleaved 1F1B
ever does; the `W`s left run at the end. Unit-time actions give this grid (D=2, v=2, M=4;
the stage is written in front):

    step   0    1    2    3    4    5    6    7    8    9    10   11   12   13   14   15   16   17   18   19   20   21   22   23   24   25
    rank0  0F0  0F1  2F0  2F1  0F2  2I0  2W0  0F3  2I1  2W1  2F2  0I0  0W0  2F3  0I1  0W1  .    2I2  2W2  .    2I3  0I2  0I3  2W3  0W2  0W3
    rank1  .    1F0  1F1  3F0  3I0  3W0  3F1  3I1  3W1  1F2  1I0  1W0  1F3  1I1  1W1  3F2  3I2  3W2  3F3  3I3  1I2  1I3  3W3  1W2  1W3  .

Why this order: an `I` costs about half a `B`, so the gradient climbs back to rank 0 sooner
and the first backwards start earlier, and the cool-down's waits, where interleaved 1F1B
idles, run the deferred `W`s. With a chunk's `F`, `I` and `W` equally long (f each: a
stage's forward F = v f, backward B = 2 v f) the step is shorter than interleaved's for
M >= D >= 2 (checked for D <= 8, M <= 16, v <= 4; D=2, M=4: 26 f against 27 f, bubble 0.077 against 0.111; D=4, M=8: 54 f against
57 f, 0.111 against 0.158). Memory is interleaved's exactly: counting a micro-batch in
flight on a stage from its `F` to its `W`, every stage peaks at interleaved's count
(`peak_in_flight`; D=4, M=8: (8, 8, 7, 5, 4, 4, 3, 1)) and every rank at interleaved's most
chunk activations held at once (D=4, M=8: 11, 9, 7, 5). Letting the ranks
hold one or two chunks more would shrink the bubble further (D=4, M=8: 0.094), memory this
schedule does not spend. With `chunks=1` the order is 1F1B's with the backward split, at
1F1B's memory.
"""  # noqa: E501 (the grid is wider than a line)

from __future__ import annotations

from collections import deque

from tfpipe.schedules.actions import Action, Schedule, check_sizes
from tfpipe.schedules.interleaved import by_stages, check_chunks, interleaved
from tfpipe.schedules.simulate import peak_in_flight


def interleaved_zb(num_ranks: int, num_micro_batches: int, chunks: int = 2) -> Schedule:
    """Interleaved 1F1B with each backward split into `I` and `W`, the `W`s filling bubbles.

    Args:
        num_ranks: D >= 1, the number of devices.
        num_micro_batches: M >= 1.
        chunks: v >= 1, model chunks (virtual stages) per rank.

    Returns:
        A `Schedule` named `"interleaved-zb"` with `num_stages = D * v`, of `F`, `I` and `W`
        actions (no `B`): interleaved's `F`s and `I`s in interleaved's order, each `W` run in
        a wait of its rank, or before an `F` that would pass interleaved's peak in flight on
        its stage or rank, or at the end. `schedule.rank_of(stage) == stage % D`.

    Raises:
        ValueError: if D, M or v is not a positive integer.

    Example:
        >>> interleaved_zb(2, 2, chunks=2).to_text()[1]
        '1F0 1F1 3F0 3I0 3W0 3F1 3I1 1I0 1I1 3W1 1W0 1W1'
    """
    check_sizes(num_ranks, num_micro_batches)
    check_chunks(chunks)
    base = interleaved(num_ranks, num_micro_batches, chunks)
    ranks = _place_weight_grads(base)
    return Schedule("interleaved-zb", num_ranks * chunks, num_micro_batches, ranks)


interleaved_zb_stages = by_stages("Interleaved zero-bubble", interleaved_zb)
"""`interleaved_zb` sized by virtual stages (the registry form)."""


def _rank_peaks(schedule: Schedule) -> list[int]:
    """Per rank, the most chunk activations held at once (from `F` to `B`/`W`)."""
    peaks = []
    for actions in schedule.ranks:
        live = peak = 0
        for a in actions:
            live += 1 if a.kind == "F" else -1 if a.kind in ("B", "W") else 0
            peak = max(peak, live)
        peaks.append(peak)
    return peaks


def _inputs(action: Action, last: int) -> list[Action]:
    """What an `F` or `I` waits for (`clock.dependencies`, every backward split)."""
    s, m = action.stage, action.micro_batch
    if action.kind == "F":
        return [Action(s - 1, "F", m)] if s > 0 else []
    return [Action(s, "F", m)] + ([Action(s + 1, "I", m)] if s < last else [])


def _place_weight_grads(base: Schedule) -> tuple[tuple[Action, ...], ...]:
    """Runs `base` (with `B` as `I`) in unit time, placing each `W` as described above."""
    stage_limit, rank_limit = peak_in_flight(base), _rank_peaks(base)
    last = base.num_stages - 1
    queues = [deque(Action(a.stage, "I" if a.kind == "B" else a.kind, a.micro_batch)
                    for a in actions) for actions in base.ranks]
    pending: list[deque[Action]] = [deque() for _ in base.ranks]  # `I` ran, `W` has not
    on_stage, on_rank = [0] * base.num_stages, [0] * base.num_ranks
    orders: list[list[Action]] = [[] for _ in base.ranks]
    done: dict[Action, int] = {}
    step = 0
    while any(queues) or any(pending):
        ran = []
        for r, (queue, waiting) in enumerate(zip(queues, pending)):
            action = None
            if queue:
                nxt = queue[0]
                if nxt.kind == "F" and on_stage[nxt.stage] >= stage_limit[nxt.stage]:
                    action = next(w for w in waiting if w.stage == nxt.stage)
                elif nxt.kind == "F" and on_rank[r] >= rank_limit[r]:
                    action = waiting[0]
                elif all(done.get(d, step) < step for d in _inputs(nxt, last)):
                    action = queue.popleft()
            if action is None and waiting:
                action = waiting[0]  # the rank would wait: run the oldest pending `W`
            if action is None:
                continue
            if action.kind == "W":
                waiting.remove(action)
            elif action.kind == "I":
                waiting.append(Action(action.stage, "W", action.micro_batch))
            delta = {"F": 1, "I": 0, "W": -1}[action.kind]
            on_stage[action.stage] += delta
            on_rank[r] += delta
            orders[r].append(action)
            ran.append(action)
        done.update((a, step) for a in ran)
        step += 1
    return tuple(tuple(order) for order in orders)
