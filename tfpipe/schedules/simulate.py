"""Event-driven timing of a schedule under given costs: step time, bubble and activation memory.

The unit-time `clock` answers "in which order may actions run"; this module answers "how long
does the step take" when forwards, backwards and transfers have real, possibly per-stage,
durations. Each rank runs its actions in schedule order; an action starts as soon as its rank
is free and every action it depends on (`clock.dependencies`) has finished, plus `transfer`
when that dependency ran on another rank. No action ever waits for anything else, so the
result is the makespan of the schedule as a fixed-order list schedule: what an ideal executor
without launch overheads would achieve. It is deterministic, pure Python and fast enough to
sweep many (K, M, chunks) in tests, which is how the closed forms of the bubble are checked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tfpipe.schedules.actions import Action, Schedule
from tfpipe.schedules.clock import dependencies
from tfpipe.schedules.validate import validate

TimedAction = tuple[int, Action, float, float]


@dataclass(frozen=True)
class Costs:
    """Durations of each kind of action, the same for all stages or one per stage.

    Args:
        forward: duration of a forward, a number or one number per stage (per virtual stage
            for interleaved schedules).
        backward: duration of a full backward `B`, a number or one per stage.
        input_grad: duration of `I`, the input-gradient half of a split backward; defaults to
            half of `backward`.
        weight_grad: duration of `W`, the weight-gradient half; defaults to half of `backward`.
        transfer: delay added when an action depends on an action that ran on another rank
            (sending an activation or a gradient between devices).

    Example:
        >>> Costs(forward=1.0, backward=2.0).duration(Action(0, "W", 0), num_stages=4)
        1.0
        >>> Costs(forward=[1.0, 2.0], backward=[2.0, 4.0]).duration(Action(1, "F", 0), 2)
        2.0
    """

    forward: float | Sequence[float]
    backward: float | Sequence[float]
    input_grad: float | Sequence[float] | None = None
    weight_grad: float | Sequence[float] | None = None
    transfer: float = 0.0

    def per_stage(self, num_stages: int) -> dict[str, tuple[float, ...]]:
        """Each kind's duration for each of `num_stages` stages.

        Args:
            num_stages: the stage count K of the schedule being timed.

        Returns:
            `{"F": (...), "B": (...), "I": (...), "W": (...)}`, K numbers each.

        Raises:
            ValueError: for a per-stage list of another length, or a negative or non-finite
                duration or transfer.
        """
        forward = _expand("forward", self.forward, num_stages)
        backward = _expand("backward", self.backward, num_stages)
        half = tuple(b / 2 for b in backward)
        input_grad = (
            half if self.input_grad is None else _expand("input_grad", self.input_grad, num_stages)
        )
        weight_grad = (
            half
            if self.weight_grad is None
            else _expand("weight_grad", self.weight_grad, num_stages)
        )
        _expand("transfer", self.transfer, 1)
        return {"F": forward, "B": backward, "I": input_grad, "W": weight_grad}

    def duration(self, action: Action, num_stages: int) -> float:
        """Duration of one action of a schedule with `num_stages` stages."""
        return self.per_stage(num_stages)[action.kind][action.stage]


def _expand(label: str, value: float | Sequence[float], num_stages: int) -> tuple[float, ...]:
    if isinstance(value, bool):
        # bool is an int, but not a duration (this was always a TypeError).
        raise TypeError(
            f"Costs.{label}={value!r}: give a number of seconds or one number per stage."
        )
    if isinstance(value, (int, float)):
        values = (float(value),) * num_stages
    else:
        values = tuple(float(v) for v in value)
        if len(values) != num_stages:
            raise ValueError(
                f"Costs.{label} has {len(values)} per-stage values {list(values)} but the "
                f"schedule has {num_stages} stages: give one value per stage, or a single "
                "number for all stages."
            )
    bad = [v for v in values if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(
            f"Costs.{label} must be finite and >= 0, got {bad}: durations are seconds (or "
            "any one time unit) and cannot be negative."
        )
    return values


@dataclass(frozen=True)
class Simulation:
    """The timed run of a schedule.

    Attributes:
        schedule: the schedule that was timed.
        costs: the costs it was timed with.
        timeline: `(rank, action, start, end)` for every action, sorted by start then rank.
        step_time: the makespan: when the last action ends (the first starts at 0).
        bubble_fraction: `1 - busy / (num_ranks * step_time)`, the idle share of the ranks'
            time; 0 for an empty step.
        busy_time: per rank, the sum of its actions' durations.
        peak_in_flight: per stage, the most micro-batches whose forward has run and whose
            activations are not yet freed (at `B`, or at `W` for a split backward).
    """

    schedule: Schedule
    costs: Costs
    timeline: list[TimedAction]
    step_time: float
    bubble_fraction: float
    busy_time: tuple[float, ...]
    peak_in_flight: tuple[int, ...]


def simulate(schedule: Schedule, costs: Costs) -> Simulation:
    """Times a schedule: each action starts when its rank is free and its inputs have arrived.

    Args:
        schedule: any schedule; it is validated first.
        costs: the duration of each kind of action, per stage, and the transfer delay.

    Returns:
        A `Simulation` with the per-action timeline, step time, bubble fraction and peak
        activations in flight per stage.

    Raises:
        ScheduleError: if the schedule breaks a rule (the message holds its grid).
        ValueError: if `costs` does not fit the schedule's stage count.

    Example:
        >>> from tfpipe.schedules import gpipe
        >>> sim = simulate(gpipe(4, 8), Costs(forward=1.0, backward=2.0))
        >>> sim.step_time, round(sim.bubble_fraction, 4), sim.peak_in_flight
        (33.0, 0.2727, (8, 8, 8, 8))
    """
    validate(schedule)
    durations = costs.per_stage(schedule.num_stages)
    transfer = float(costs.transfer)
    ends: dict[Action, float] = {}
    free = [0.0] * schedule.num_ranks
    pos = [0] * schedule.num_ranks
    timeline: list[TimedAction] = []
    progressed = True
    while progressed:
        progressed = False
        for r, actions in enumerate(schedule.ranks):
            while pos[r] < len(actions):
                action = actions[pos[r]]
                deps = dependencies(action, schedule)
                if any(d not in ends for d in deps):
                    break
                start = max(
                    [free[r]]
                    + [
                        ends[d] + (transfer if schedule.rank_of(d.stage) != r else 0.0)
                        for d in deps
                    ]
                )
                end = start + durations[action.kind][action.stage]
                ends[action] = free[r] = end
                timeline.append((r, action, start, end))
                pos[r] += 1
                progressed = True
    # `validate` ran the clock, so every action was reached; this only guards that invariant.
    assert len(timeline) == sum(len(a) for a in schedule.ranks), "simulate lost actions"
    timeline.sort(key=lambda t: (t[2], t[0], t[3]))
    step_time = max((t[3] for t in timeline), default=0.0)
    busy = tuple(sum(durations[a.kind][a.stage] for a in actions) for actions in schedule.ranks)
    capacity = schedule.num_ranks * step_time
    bubble = 1.0 - sum(busy) / capacity if capacity > 0 else 0.0
    return Simulation(
        schedule=schedule,
        costs=costs,
        timeline=timeline,
        step_time=step_time,
        bubble_fraction=bubble,
        busy_time=busy,
        peak_in_flight=peak_in_flight(schedule),
    )


def peak_in_flight(schedule: Schedule) -> tuple[int, ...]:
    """Per stage, the most micro-batches holding activations at once.

    A micro-batch is in flight on a stage from its `F` until its `B`, or until its `W` when
    the backward is split (the weight gradient still needs the stage's saved inputs). Only the
    order on the stage's rank matters, so no timing is needed.

    Args:
        schedule: a schedule with valid action counts.

    Returns:
        One count per stage, `num_stages` in all.
    """
    peaks = [0] * schedule.num_stages
    live = [0] * schedule.num_stages
    for actions in schedule.ranks:
        for a in actions:
            if a.kind == "F":
                live[a.stage] += 1
                peaks[a.stage] = max(peaks[a.stage], live[a.stage])
            elif a.kind in ("B", "W"):
                live[a.stage] -= 1
    return tuple(peaks)
