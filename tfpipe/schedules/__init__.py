"""Pipeline schedules as pure data: generators, validator, clock and text grid (no TensorFlow)."""

from __future__ import annotations

from typing import Callable

from tfpipe.schedules.actions import KINDS, Action, Schedule
from tfpipe.schedules.clock import clock, dependencies
from tfpipe.schedules.format import format_schedule
from tfpipe.schedules.gpipe import gpipe
from tfpipe.schedules.validate import ScheduleError, validate

GENERATORS: dict[str, Callable[[int, int], Schedule]] = {"gpipe": gpipe}


def get(name_or_schedule: "str | Schedule", num_stages: int, num_micro_batches: int) -> Schedule:
    """Resolves a schedule name (or a user-made `Schedule`) and validates it.

    Args:
        name_or_schedule: one of `GENERATORS`' names, or a `Schedule`.
        num_stages: K, the pipeline's stage count.
        num_micro_batches: M, the micro-batch count.

    Returns:
        A validated `Schedule` for K stages and M micro-batches.

    Raises:
        ValueError: for an unknown name, or a user schedule of another size.
        ScheduleError: for a schedule that breaks a rule (with its grid).
    """
    if isinstance(name_or_schedule, Schedule):
        sched = name_or_schedule
        if (sched.num_stages, sched.num_micro_batches) != (num_stages, num_micro_batches):
            raise ValueError(
                f"Schedule {sched.name!r} is for {sched.num_stages} stages x "
                f"{sched.num_micro_batches} micro-batches, but the pipeline has {num_stages} "
                f"stages x {num_micro_batches} micro-batches: build it for that size."
            )
        return validate(sched)
    if name_or_schedule not in GENERATORS:
        raise ValueError(
            f"Unknown schedule {name_or_schedule!r}: use one of {sorted(GENERATORS)} or pass "
            "a tfpipe.schedules.Schedule."
        )
    return validate(GENERATORS[name_or_schedule](num_stages, num_micro_batches))


__all__ = [
    "KINDS", "Action", "Schedule", "ScheduleError", "GENERATORS", "clock", "dependencies",
    "format_schedule", "get", "gpipe", "validate",
]
