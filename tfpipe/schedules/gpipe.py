"""GPipe (fill-drain): every stage runs all forwards, then all backwards.

With K stages and M micro-batches, unit-time actions give this grid (K=3, M=3):

    step   0   1   2   3   4   5   6   7   8   9
    rank0  F0  F1  F2  .   .   .   .   B0  B1  B2
    rank1  .   F0  F1  F2  .   .   B0  B1  B2  .
    rank2  .   .   F0  F1  F2  B0  B1  B2  .   .

Bubble fraction (K-1)/(M+K-1); every stage holds the activations of all M micro-batches at
the turn from forward to backward, which is the memory price of the simple order.
"""

from __future__ import annotations

from tfpipe.schedules.actions import Action, Schedule, check_sizes


def gpipe(num_stages: int, num_micro_batches: int) -> Schedule:
    """The GPipe fill-drain schedule.

    Args:
        num_stages: K >= 1, one stage per rank.
        num_micro_batches: M >= 1.

    Returns:
        A `Schedule` whose rank s runs `F0 .. F{M-1}` then `B0 .. B{M-1}` of stage s.

    Example:
        >>> gpipe(2, 2).to_text()
        ['F0 F1 B0 B1', 'F0 F1 B0 B1']
    """
    check_sizes(num_stages, num_micro_batches)
    ranks = tuple(
        tuple(Action(s, "F", m) for m in range(num_micro_batches))
        + tuple(Action(s, "B", m) for m in range(num_micro_batches))
        for s in range(num_stages)
    )
    return Schedule("gpipe", num_stages, num_micro_batches, ranks)
