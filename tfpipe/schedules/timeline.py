"""Figures of one measured step's timeline: its span and each rank's busy time.

Design: a timeline is plain data (`Pipeline.timeline()`: `(rank, action, start_ms, end_ms)`
per action), so the arithmetic on it is pure and shared by everything that reports it (the
`PipelineMonitor` callback, the benchmarks). A rank's compute time is the summed span of its
actions; its idle time is the rest of the step (its share of the bubble).
"""

from __future__ import annotations

from collections.abc import Sequence

from tfpipe.schedules.actions import Action

Timeline = Sequence[tuple[int, Action, float, float]]
"""Measured `(rank, action, start_ms, end_ms)` of every action of one step."""


def rank_busy(timeline: Timeline) -> tuple[float, dict[int, float]]:
    """The step's span and each rank's compute time, in the timeline's unit (ms).

    Args:
        timeline: `(rank, action, start, end)` of each action of one step, not empty.

    Returns:
        `(step, busy)`: `step` from the first action's start to the last one's end, and
        `busy[rank]` the summed `end - start` of that rank's actions (only ranks with actions).

    Example:
        >>> rank_busy([(0, Action(0, "F", 0), 0.0, 2.0), (1, Action(1, "F", 0), 2.5, 4.0)])
        (4.0, {0: 2.0, 1: 1.5})
    """
    step = max(end for *_, end in timeline) - min(start for _, _, start, _ in timeline)
    busy: dict[int, float] = {}
    for rank, _, start, end in timeline:
        busy[rank] = busy.get(rank, 0.0) + (end - start)
    return step, busy


def idle(step: float, busy: float) -> float:
    """A rank's idle time in a step of `step` where it computed `busy` (never negative)."""
    return max(step - busy, 0.0)
