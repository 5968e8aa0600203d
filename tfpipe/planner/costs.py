"""The planner's cost model: predicted step time and per-device peak memory of one configuration.

Design: pure Python over a measured `Profile` (no TensorFlow), so the search can time hundreds
of configurations in a second and tests can use hand-made profiles. Time comes from the
schedule simulator (`tfpipe.schedules.simulate`) fed with per-stage durations that follow
what the executor does, not an ideal:

- A stage's forward + backward is the sum of its layer calls' measured times at the
  micro-batch size B/M actually run (the largest micro-batch, `ceil(B/M)`, which every
  action waits for): small micro-batches cost what they measured, not a linear share.
- The measured time is split 1:2 into forward and backward (`FORWARD_SHARE`), the usual
  ratio for layers whose backward computes input and weight gradients.
- A recomputed stage runs its forward again inside its backward (`B`, or `I` for split
  backwards), so that action costs one more forward.
- A split backward's `I` costs a whole backward and its `W` nothing (`ZB_INPUT_GRAD`,
  `ZB_WEIGHT_GRAD`): `I` runs the gradient function TensorFlow made for the stage function's
  call, which computes the weight gradients too, and sums them (`tfpipe.executor.step`).
  Measured on two one-core workers (DualPipeV, M = 4, batch 2048, chunks of 2 Dense(1024)),
  when `W` still re-derived them: `B` 42-49 ms, `I` 43-44 ms, `W` 43-44 ms; priced at half a
  backward, `I` made DualPipeV's predicted step 1.21x too short.
- Every hop between devices costs `latency + bytes crossing the cut x micro-batch size /
  bandwidth`. The simulator takes one delay for all hops, so the largest cut's is used.
  `tfpipe.plan` measures latency and bandwidth between its first two devices
  (`tfpipe.planner.profile.measure_transfer`); without a measurement the latency is 0 and the
  bandwidth `LOCAL_BANDWIDTH` (10 GB/s, a PCIe 3 x16 link or a host memory copy), or
  `REMOTE_BANDWIDTH` (1 GB/s, about 10 Gb Ethernet) when a device is on a worker (`/job:`).
  An infinite bandwidth (a large tensor measured no slower than a small one) makes a hop
  cost its latency alone.

Each step also pays a fixed cost for starting one function on the devices it uses
(`step_overhead[K - 1]` for K devices: the planner times an empty call on the first K devices;
about 2 ms on two worker processes, well under 1 ms locally), added once to every step.

Devices that share one processor (logical CPU devices of one process share its thread pool)
do not run at the same time: with `parallel=False` the step is the sum of all actions'
durations and transfers (or the makespan, if longer), whatever the schedule's overlap.

Memory per device is its stages' state (parameters, gradients and optimizer slots, from the
profile; with M > 1 the gradients count `ACCUMULATING_GRADIENTS` times, as the running sum, one
micro-batch's gradients and their new sum exist at once) plus the most activation bytes it
holds at once, found by walking its actions in schedule order: a forward keeps the stage's
inputs and outputs of its layer calls for one micro-batch (only its inputs when recomputed)
until its `B` (or `W`); a recomputed stage holds one micro-batch's layer outputs again while it
replays, and from `I` to `W` when the backward is split. This is
`tfpipe.schedules.peak_in_flight` weighted by bytes, summed over the stages a device holds
(interleaved schedules).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tfpipe import schedules
from tfpipe.options import RECOMPUTE_MODES
from tfpipe.planner.records import Profile
from tfpipe.report import format_bytes as format_bytes  # re-exported: planner tables, messages
from tfpipe.schedules import Costs, Schedule, Simulation, dependencies

FORWARD_SHARE = 1.0 / 3.0
"""Share of a layer call's measured forward + backward time spent in the forward."""

ZB_INPUT_GRAD = 1.0
"""A split backward's `I` as a fraction of a full backward (it runs the stage's whole gradient
function and keeps the weight gradients too)."""

ZB_WEIGHT_GRAD = 0.0
"""A split backward's `W` as a fraction of a full backward (its `I` left it nothing to do)."""

LOCAL_BANDWIDTH = 10e9
"""Default bytes per second between devices of one host."""

REMOTE_BANDWIDTH = 1e9
"""Default bytes per second when a device is on a TensorFlow worker."""

ACCUMULATING_GRADIENTS = 3.0
"""Gradient-sized tensors per parameter alive at once while a stage adds one micro-batch's
weight gradients to its running sum (the sum, the new gradients and the new sum; the
executor chains the additions, `executor.program.gradient_waits`); 1 when M = 1."""


@dataclass(frozen=True)
class Estimate:
    """The cost model's prediction for one configuration.

    Attributes:
        simulation: the simulated step (timeline in seconds, step time, bubble fraction).
        step_time: predicted seconds per step: the simulated makespan, or for devices that
            share one processor the sum of all actions' durations and transfers, plus the
            step's fixed cost.
        peak_bytes: per device (rank), the most bytes it holds during the step.
        transfer: the per-hop delay used, in seconds.
        micro_batch_size: the samples per micro-batch the durations were measured at.
    """

    simulation: Simulation
    step_time: float
    peak_bytes: tuple[float, ...]
    transfer: float
    micro_batch_size: int


class CostModel:
    """Predicts step time and memory of configurations from a `Profile`.

    Args:
        profile: the measured profile of the model.
        batch_size: B, samples per training step.
        bandwidth: bytes per second between devices (`math.inf`: bytes cost nothing).
        parallel: whether the devices compute at the same time (False for logical CPU
            devices, which share one thread pool).
        step_overhead: seconds a step pays whatever it computes, per number of devices used
            (entry K-1 for K devices; the last entry for more). Default: none.
        latency: seconds every hop between devices pays whatever its size. Default 0.

    Example:
        >>> est = CostModel(profile, batch_size=64, bandwidth=10e9).estimate(
        ...     balance=[5, 4], micro_batches=8, schedule="1f1b")
        >>> est.simulation.step_time, est.peak_bytes
    """

    def __init__(
        self,
        profile: Profile,
        batch_size: int,
        bandwidth: float,
        parallel: bool = True,
        step_overhead: Sequence[float] = (),
        latency: float = 0.0,
    ) -> None:
        if math.isnan(bandwidth) or bandwidth <= 0:
            raise ValueError(f"bandwidth must be a positive number of bytes/s, got {bandwidth!r}.")
        if not math.isfinite(latency) or latency < 0:
            raise ValueError(f"latency must be a number of seconds >= 0, got {latency!r}.")
        self.profile = profile
        self.batch_size = batch_size
        self.bandwidth = float(bandwidth)
        self.parallel = parallel
        self.step_overhead = tuple(float(t) for t in step_overhead)
        self.latency = float(latency)
        self._schedules: dict[tuple[str, int, int, int], Schedule] = {}

    def micro_batch_size(self, micro_batches: int) -> int:
        """The largest micro-batch of a batch cut into `micro_batches`: `ceil(B / M)`."""
        return -(-self.batch_size // micro_batches)

    def schedule(self, name: str, num_stages: int, micro_batches: int, chunks: int) -> Schedule:
        """The validated schedule (cached: the search asks for each one many times)."""
        key = (name, num_stages, micro_batches, chunks)
        if key not in self._schedules:
            self._schedules[key] = schedules.get(name, num_stages, micro_batches, chunks=chunks)
        return self._schedules[key]

    def estimate(
        self,
        balance: Sequence[int],
        micro_batches: int,
        schedule: str,
        chunks: int = 1,
        recompute: str = "never",
    ) -> Estimate:
        """Predicts one configuration.

        Args:
            balance: layer calls per model piece (K*chunks entries, summing to n).
            micro_batches: M.
            schedule: a schedule name of `tfpipe.schedules.GENERATORS`.
            chunks: model pieces per device (`"interleaved"` only).
            recompute: `"never"`, `"except_last"` or `"always"`, as `Pipeline(recompute=)`.

        Returns:
            The `Estimate`: simulated step (seconds) and peak bytes per device.

        Raises:
            ValueError: for a balance that does not cover the profile's layer calls, or an
                unknown recompute mode.
        """
        prof = self.profile
        if sum(balance) != prof.num_layers or any(b < 1 for b in balance):
            raise ValueError(
                f"balance={list(balance)} must be positive and sum to the profile's "
                f"{prof.num_layers} layer calls."
            )
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute={recompute!r}: use one of {RECOMPUTE_MODES}.")
        num_stages = len(balance)
        sched = self.schedule(schedule, num_stages, micro_batches, chunks)
        size = self.micro_batch_size(micro_batches)
        per_layer = prof.layer_seconds(size)
        bounds = [0]
        for b in balance:
            bounds.append(bounds[-1] + b)
        spans = list(zip(bounds, bounds[1:]))
        flags = [
            recompute == "always" or (recompute == "except_last" and k < num_stages - 1)
            for k in range(num_stages)
        ]
        total = [sum(per_layer[a:b]) for a, b in spans]
        forward = [FORWARD_SHARE * t for t in total]
        backward = [(1.0 - FORWARD_SHARE) * t for t in total]
        full_b = [bw + (fw if r else 0.0) for fw, bw, r in zip(forward, backward, flags)]
        input_grad = [
            ZB_INPUT_GRAD * bw + (fw if r else 0.0) for fw, bw, r in zip(forward, backward, flags)
        ]
        weight_grad = [ZB_WEIGHT_GRAD * bw for bw in backward]
        cut = max((prof.cut_bytes(a) for a, _ in spans[1:]), default=0.0)
        transfer = self.latency + cut * size / self.bandwidth if sched.num_ranks > 1 else 0.0
        costs = Costs(forward, full_b, input_grad, weight_grad, transfer=transfer)
        sim = schedules.simulate(sched, costs)
        kept, work, state = [], [], []
        for (a, b), r in zip(spans, flags):
            inputs = prof.stage_input_bytes(a, b) * size
            outputs = sum(prof.activation_bytes[a:b]) * size
            kept.append(inputs if r else inputs + outputs)
            work.append(outputs if r else 0.0)  # a replay's activations beside the kept inputs
            accumulating = 4.0 * sum(prof.params[a:b]) * (ACCUMULATING_GRADIENTS - 1.0)
            state.append(sum(prof.state_bytes[a:b]) + (accumulating if micro_batches > 1 else 0))
        peaks = tuple(_rank_peak(sched, r, kept, work, state) for r in range(sched.num_ranks))
        step = sim.step_time
        if not self.parallel:
            step = max(step, sum(sim.busy_time) + _hops(sched) * transfer)
        if self.step_overhead:
            step += self.step_overhead[min(sched.num_ranks, len(self.step_overhead)) - 1]
        return Estimate(sim, step, peaks, transfer, size)


def _hops(sched: Schedule) -> int:
    """How many activations and gradients a step sends between ranks."""
    return sum(
        1
        for r, actions in enumerate(sched.ranks)
        for a in actions
        for d in dependencies(a, sched)
        if sched.rank_of(d.stage) != r
    )


def _rank_peak(
    sched: Schedule, rank: int, kept: list[float], work: list[float], state: list[float]
) -> float:
    """Most bytes rank `rank` holds: its stages' state plus the activations alive at once."""
    live = peak = 0.0
    stages = set()
    for a in sched.ranks[rank]:
        s = a.stage
        stages.add(s)
        if a.kind == "F":
            live += kept[s]
        elif a.kind in "BI":  # an `I` frees what a `B` frees; its `W` holds nothing
            peak = max(peak, live + work[s])
            live -= kept[s]
        peak = max(peak, live)
    return peak + sum(state[s] for s in stages)


_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_bytes(value: float | str) -> float:
    """A byte count from a number or a text such as `"2GiB"`, `"512 MiB"` or `"1.5GB"`.

    Args:
        value: bytes as a number, or a number with a unit: B, KB, MB, GB, TB (powers of
            1000) or KiB, MiB, GiB, TiB (powers of 1024), in any case.

    Returns:
        The number of bytes.

    Raises:
        ValueError: for a negative number, or text that is not a number with a known unit.

    Example:
        >>> parse_bytes("2GiB"), parse_bytes("1.5 GB"), parse_bytes(4096)
        (2147483648.0, 1500000000.0, 4096.0)
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        number_unit = r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*"
        match = re.fullmatch(number_unit, str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"Cannot read {value!r} as a size in bytes: write a number with an optional "
                "unit, for example 2GiB, 512MiB or 1.5GB."
            )
        number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"A size in bytes must be a finite number >= 0, got {value!r}.")
    return number

