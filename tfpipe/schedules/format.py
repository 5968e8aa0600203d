"""The step x rank text grid of a schedule, the picture every schedule error prints.

The grid is the unit-time `clock` drawn as a table: it shows order and overlap, not real
durations (see `simulate` and `plot` for those). It is plain text so that it fits in an
exception message, a test's literal expected value and a docstring alike.
"""

from __future__ import annotations

from tfpipe.schedules.actions import Action, Schedule
from tfpipe.schedules.clock import Deadlock, Timeline, clock


def format_schedule(schedule: Schedule, mark: Action | None = None) -> str:
    """Renders the unit-time grid: one row per rank, one column per step.

    Args:
        schedule: a schedule whose action counts are valid.
        mark: an action to highlight as `>F3<`.

    Returns:
        The grid as text, one column per unit step; `.` is an idle step. A deadlocked schedule
        shows the steps that ran, then each rank's remaining actions after `|`, the blocked
        ones marked `!F3!`.

    Example:
        >>> from tfpipe.schedules import gpipe
        >>> print(format_schedule(gpipe(2, 2)))
        step   0   1   2   3   4   5
        rank0  F0  F1  .   .   B0  B1
        rank1  .   F0  F1  B0  B1  .
    """
    try:
        return grid(schedule, clock(schedule), mark=mark)
    except Deadlock as dead:
        return grid(schedule, dead.timeline, mark=mark, blocked=dead.blocked)


def grid(
    schedule: Schedule,
    timeline: Timeline,
    mark: Action | None = None,
    blocked: list[Action] | None = None,
) -> str:
    """Renders a (possibly partial) timeline as the step x rank grid."""
    multi = any(
        len({a.stage for a in r}) > 1 or any(a.stage != i for a in r)
        for i, r in enumerate(schedule.ranks)
    )
    steps = 1 + max((t for t, _ in timeline), default=-1)
    cells = [["."] * steps for _ in schedule.ranks]
    placed: set[Action] = set()
    for t, a in timeline:
        cells[schedule.rank_of(a.stage)][t] = _cell(a, multi, mark)
        placed.add(a)
    blocked = blocked or []
    for r, actions in enumerate(schedule.ranks):
        rest = [a for a in actions if a not in placed]
        if rest:
            cells[r].append("|")
            cells[r].extend(_cell(a, multi, mark, a in blocked) for a in rest)
    width = max([len(c) for row in cells for c in row] + [len(str(steps)), 2]) + 2
    header = "step   " + "".join(str(t).ljust(width) for t in range(steps))
    rows = [
        f"rank{r}".ljust(7) + "".join(c.ljust(width) for c in row) for r, row in enumerate(cells)
    ]
    text = "\n".join([header.rstrip()] + [row.rstrip() for row in rows])
    if blocked:
        text += "\n(! marks actions waiting on an input that never comes: deadlock)"
    return text


def _cell(action: Action, multi: bool, mark: Action | None, blocked: bool = False) -> str:
    text = action.text(multi)
    text = f"!{text}!" if blocked else text
    return f">{text}<" if action == mark else text
