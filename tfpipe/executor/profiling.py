"""Per-action start and end stamps of a training step (`profile=True`), and their timeline.

Design:
- Profiling brackets each action with `tf.timestamp()` ops tied to its inputs and outputs and
  stores them in a variable, so one step's measured timeline can be read back and drawn
  beside the simulated one.
- A bare `tf.timestamp` is a stateful op without resource inputs, which `tf.function` runs in
  program order, one after another over all devices: that serialised the whole step. A stamp
  taken only when its inputs are ready is no better: on a busy device an action's start stamp
  then fires long before its ops get their turn. So each stamp is a small function that also
  increments a counter variable of its device: writes to one resource run in program order,
  so the stamps and actions of one device run in the schedule's order, one after another (as
  the device runs them anyway), while devices stay free of each other.
- Profiling off is `NoStamper`, which only holds an action's inputs behind the schedule's
  waits, so the executor's hot path has no profiling branches: it always calls
  `start` / `end` / `finish`, and the stamper decides what they cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import keras
import tensorflow as tf

from tfpipe.executor.grads import dense, dense_leaves
from tfpipe.executor.program import Run, global_rank
from tfpipe.schedules import Action, Schedule


def hold(inputs: Any, gate: list[tf.Tensor]) -> Any:
    """`inputs`, passed through `tf.identity` under `gate` when there is one, so that what
    consumes them cannot start before the gate ran."""
    if not gate:
        return inputs
    with tf.control_dependencies(gate):
        return keras.tree.map_structure(lambda t: tf.identity(t) if t is not None else None, inputs)


class NoStamper:
    """Profiling off: actions are held behind their waits, and nothing is measured.

    Attributes:
        stamps: the variable of `(start, end)` per run; None when profiling is off.
    """

    stamps: tf.Variable | None = None

    def begin(self) -> None:
        """Starts tracing a new training step."""

    def start(
        self, device: str, inputs: Any, after: Sequence[tf.Tensor], ready: Sequence[Any] = ()
    ) -> Any:
        """Holds an action's `inputs` until `after` ran; with profiling, stamps its start.

        Args:
            device: the device the action runs on.
            inputs: what the action consumes: a forward's input structure, or the output
                gradients (seeds) of a backward-type action.
            after: tensors of the action that must run first (on this rank, by the schedule).
            ready: tensors the start stamp (only) waits for: what the forward of a backward's
                stage and micro-batch made, since the last stage's output gradients are ones,
                which need nothing, though its backward needs the forward's activations.

        Returns:
            `inputs`, held behind the gate when there is one.
        """
        return hold(inputs, list(after))

    def end(self, device: str, produced: list[Any]) -> None:
        """With profiling, stamps the end of the action that made `produced`."""

    def finish(self, done: list[tf.Tensor]) -> None:
        """With profiling, stores the step's stamps once every action in `done` ran."""


class Stamper(NoStamper):
    """Profiling on: a start and an end stamp per action, ordered per device.

    Args:
        devices: every device an action runs on.
        num_runs: how many actions one training step runs (rows of `stamps`).
    """

    def __init__(self, devices: Iterable[str], num_runs: int) -> None:
        self.clocks: dict[str, tuple[tf.Variable, Any]] = {}
        for device in devices:
            with tf.device(device):
                var = tf.Variable(0.0, trainable=False, name="tfpipe_clock")

            @tf.function(autograph=False)  # type: ignore[untyped-decorator]
            def stamp(after: tf.Tensor, var: tf.Variable = var) -> tf.Tensor:
                with tf.control_dependencies([after]):
                    tick = var.assign_add(1.0)
                with tf.control_dependencies([tick]):
                    return tf.timestamp()

            self.clocks[device] = (var, stamp)
        self.num_runs = num_runs
        self.stamps = tf.Variable(
            tf.zeros((num_runs, 2), tf.float64), trainable=False, name="tfpipe_action_times"
        )
        self.taken: list[tf.Tensor] = []

    def begin(self) -> None:
        self.taken = []

    def start(
        self, device: str, inputs: Any, after: Sequence[tf.Tensor], ready: Sequence[Any] = ()
    ) -> Any:
        stamp = self._timestamp(device, dense_leaves(inputs) + list(after) + list(ready))
        self.taken.append(stamp)
        return hold(inputs, [stamp])

    def end(self, device: str, produced: list[Any]) -> None:
        self.taken.append(self._timestamp(device, dense(produced)))

    def finish(self, done: list[tf.Tensor]) -> None:
        assert self.stamps is not None
        with tf.control_dependencies(done):
            self.stamps.assign(tf.reshape(tf.stack(self.taken), (self.num_runs, 2)))

    def _timestamp(self, device: str, after: list[tf.Tensor]) -> tf.Tensor:
        """`tf.timestamp()` on `device` once `after` ran and after the earlier stamps of that
        device, but not those of other devices (module docstring).

        The stamp function gets `after` as a data input (a gated read of its clock), since
        control inputs of a function call do not reach ops inside it once it is inlined.
        """
        var, stamp = self.clocks[device]
        with tf.control_dependencies(after):
            token = tf.identity(var.read_value())
        return stamp(token)


def stamper(profile: bool, devices: Iterable[str], num_runs: int) -> NoStamper:
    """A `Stamper` when `profile`, else a `NoStamper`."""
    return Stamper(devices, num_runs) if profile else NoStamper()


def timeline(
    stamps: tf.Variable | None, schedule: Schedule, runs: list[Run]
) -> list[tuple[int, Action, float, float]]:
    """Measured `(rank, action, start, end)` of the latest profiled step, ms from its start.

    Raises:
        ValueError: when the pipeline was built without `profile=True`.
    """
    if stamps is None:
        raise ValueError("No timeline: build the Pipeline with profile=True, then fit.")
    times = stamps.numpy()
    origin = times[:, 0].min()
    return [
        (global_rank(schedule, r, a), a, 1e3 * (t0 - origin), 1e3 * (t1 - origin))
        for (r, a), (t0, t1) in zip(runs, times)
    ]
