"""Checks that a schedule is complete, ordered and deadlock-free, printing the grid if not.

Every rule is checked on the data alone, before any TensorFlow work, so a bad schedule fails
at once with a picture instead of hanging or raising deep inside a traced step. Each error
names the rule and the offending action and shows the step x rank grid (`format`) with that
action marked `>F3<`; for a deadlock the blocked actions are marked `!F3!`.
"""

from __future__ import annotations

from collections import Counter

from tfpipe.schedules.actions import Action, Schedule
from tfpipe.schedules.clock import Deadlock, clock
from tfpipe.schedules.format import format_schedule, grid


class ScheduleError(ValueError):
    """A schedule breaks a rule; the message holds the step x rank grid."""


def validate(schedule: Schedule) -> Schedule:
    """Checks every rule a pipeline schedule must keep.

    Rules:
    1. No action appears twice, and every action is inside K stages x M micro-batches.
    2. Each (stage, micro-batch) has one `F` and either one `B` or one `I` and one `W` (a
       stage may run some backwards whole and others split, as DualPipeV does).
    3. On its rank, a stage's `F` comes before its backward, and `I` before `W`.
    4. The ranks' orders do not deadlock: forwards flow from stage s-1 to s, backwards from
       s+1 to s (see `clock.dependencies`).

    Args:
        schedule: the schedule to check.

    Returns:
        The same schedule, so that `validate(gpipe(4, 8))` can be used inline.

    Raises:
        ScheduleError: naming the rule and the offending action, with the grid printed and
            that action marked.

    Example:
        >>> from tfpipe.schedules import Schedule
        >>> try:
        ...     validate(Schedule.from_text(["F0 B0", "B0 F0"]))
        ... except ScheduleError as error:
        ...     print(str(error).splitlines()[0][:60])
        Schedule 'custom' (2 stages, 1 micro-batches) is invalid: 1B
    """
    seen = Counter(a for r in schedule.ranks for a in r)
    _check_actions(schedule, seen)  # rule 1
    _check_backwards(schedule, seen)  # rule 2
    _check_rank_order(schedule)  # rule 3
    _check_deadlock(schedule)  # rule 4
    return schedule


def _check_actions(schedule: Schedule, seen: Counter[Action]) -> None:
    """Rule 1: no action twice, every action inside K stages x M micro-batches."""
    K, M = schedule.num_stages, schedule.num_micro_batches
    for a, n in seen.items():
        if n > 1:
            _fail(schedule, f"{a.text(True)} (stage {a.stage}) appears {n} times; keep one", a)
        if a.stage >= K or a.micro_batch >= M:
            _fail(schedule, f"{a.text(True)} is outside {K} stages x {M} micro-batches", a)


def _check_backwards(schedule: Schedule, seen: Counter[Action]) -> None:
    """Rule 2: one F and one B (or one I and one W) per (stage, micro-batch)."""
    K, M = schedule.num_stages, schedule.num_micro_batches
    for s in range(K):
        for m in range(M):
            f, b = Action(s, "F", m), Action(s, "B", m)
            i, w = Action(s, "I", m), Action(s, "W", m)
            if f not in seen:
                back = next((x for x in (b, i, w) if x in seen), None)
                _fail(
                    schedule,
                    f"stage {s} never runs the forward F{m}; add it before its backward",
                    back,
                )
            if b in seen and i in seen:
                _fail(
                    schedule,
                    f"stage {s} has both B{m} and I{m} for micro-batch {m}; run "
                    "either B, or I and W",
                    b,
                )
            if b not in seen and i not in seen and w not in seen:
                _fail(
                    schedule,
                    f"stage {s} has no backward (B, or I and W) for micro-batch "
                    f"{m}; add B{m} after F{m}",
                    f,
                )
            if (i in seen) != (w in seen):
                missing = "W" if i in seen else "I"
                _fail(
                    schedule,
                    f"stage {s} splits the backward of micro-batch {m} into I "
                    f"and W but has no {missing}{m}; add it",
                    i if i in seen else w,
                )


def _check_rank_order(schedule: Schedule) -> None:
    """Rule 3: on its rank, a stage's F comes before its backward, and I before W."""
    for r, actions in enumerate(schedule.ranks):
        index = {a: n for n, a in enumerate(actions)}
        for a in actions:
            before = {"B": "F", "I": "F", "W": "I"}.get(a.kind)
            if before and index[Action(a.stage, before, a.micro_batch)] > index[a]:
                _fail(
                    schedule,
                    f"{a.text(True)} comes before {before}{a.micro_batch} of "
                    f"stage {a.stage} on rank {r}; move it after",
                    a,
                )


def _check_deadlock(schedule: Schedule) -> None:
    """Rule 4: the ranks' orders do not wait for each other forever."""
    try:
        clock(schedule)
    except Deadlock as dead:
        blocked = ", ".join(a.text(True) for a in dead.blocked)
        raise ScheduleError(
            f"Schedule {schedule.name!r} deadlocks: {blocked} "
            "wait for each other (a stage's forward needs the previous stage's forward, its "
            "backward the next stage's backward). Reorder the actions.\n"
            + grid(schedule, dead.timeline, blocked=dead.blocked)
        ) from None


def _fail(schedule: Schedule, what: str, mark: Action | None) -> None:
    picture = format_schedule(schedule, mark=mark)
    legend = f"\n(>{mark.text(True)}< marks the offending action)" if mark is not None else ""
    raise ScheduleError(
        f"Schedule {schedule.name!r} ({schedule.num_stages} stages, "
        f"{schedule.num_micro_batches} micro-batches) is invalid: {what}.\n{picture}{legend}"
    )


__all__ = ["ScheduleError", "validate", "format_schedule"]
