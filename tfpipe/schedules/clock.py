"""Unit-time clock: the step at which each action of a schedule runs, given its dependencies.

Every action takes one step; an action runs at the first step where it is next on its rank
and everything it depends on finished at an earlier step. This is torchgpipe's
`clock_cycles` generalised to any schedule given as data, and it serves three users: the
text grid (`format`), the validator (a schedule that stops making progress is deadlocked),
and the executor, which traces actions in clock order so that every input an action needs
already exists when it is traced.

Dependencies of an action of stage s on micro-batch m (K stages):
- `F`: the `F` of stage s-1 (the activation it consumes).
- `B` / `I`: the `F` of stage s, and the `B` or `I` of stage s+1 on micro-batch m (the
  gradient it consumes; a stage may split some of its backwards and not others).
- `W`: the `I` of stage s (which recorded what the weight gradient needs).
"""

from __future__ import annotations

from tfpipe.schedules.actions import Action, Schedule

Timeline = list[tuple[int, Action]]


def dependencies(action: Action, schedule: Schedule) -> list[Action]:
    """The actions that must finish before `action` may start.

    Args:
        action: an action of `schedule`.
        schedule: the schedule, which says whether stage s+1 splits its backward of the
            action's micro-batch.

    Returns:
        The actions `action` consumes the outputs of (see the module docstring).
    """
    s, m, last = action.stage, action.micro_batch, schedule.num_stages - 1
    if action.kind == "F":
        return [Action(s - 1, "F", m)] if s > 0 else []
    if action.kind == "W":
        return [Action(s, "I", m)]
    deps = [Action(s, "F", m)]
    if s < last:
        deps.append(Action(s + 1, "I" if schedule.splits_backward(s + 1, m) else "B", m))
    return deps


class Deadlock(Exception):
    """Raised by `clock` when no rank can run its next action."""

    def __init__(self, timeline: Timeline, blocked: list[Action]) -> None:
        super().__init__(f"deadlock at {[a.text(True) for a in blocked]}")
        self.timeline = timeline
        self.blocked = blocked


def clock(schedule: Schedule) -> Timeline:
    """Runs the schedule with unit-time actions.

    Args:
        schedule: the schedule; its action counts should already be valid.

    Returns:
        `(step, action)` pairs sorted by step, then rank.

    Raises:
        Deadlock: when no rank can run its next action; carries the partial timeline and the
            blocked actions so that `validate` can print the grid.

    Example:
        >>> from tfpipe.schedules import gpipe
        >>> [(step, a.text(with_stage=True)) for step, a in clock(gpipe(2, 1))]
        [(0, '0F0'), (1, '1F0'), (2, '1B0'), (3, '0B0')]
    """
    pos = [0] * schedule.num_ranks
    done_at: dict[Action, int] = {}
    timeline: Timeline = []
    step = 0
    total = sum(len(r) for r in schedule.ranks)
    while len(timeline) < total:
        ran = []
        for r, actions in enumerate(schedule.ranks):
            if pos[r] >= len(actions):
                continue
            action = actions[pos[r]]
            deps = dependencies(action, schedule)
            if all(done_at.get(d, step) < step for d in deps):
                ran.append((r, action))
        if not ran:
            blocked = [acts[p] for acts, p in zip(schedule.ranks, pos) if p < len(acts)]
            raise Deadlock(timeline, blocked)
        for r, action in ran:
            pos[r] += 1
            done_at[action] = step
            timeline.append((step, action))
        step += 1
    return timeline
