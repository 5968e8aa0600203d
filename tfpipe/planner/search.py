"""The planner's search: every stage count, split, micro-batch count, schedule and recompute mode.

Design: the search is exhaustive over a small space rather than clever, because each
candidate costs one simulation of at most a few hundred actions (`CostModel.estimate`, pure
Python): stage counts 1..len(devices), for each the optimal contiguous split
(`tfpipe.balance.solve`) of the layer times measured at that micro-batch size and, when it
differs, of the layer bytes; micro-batch counts from a small divisor-friendly set up to the
batch size; the four built-in schedules where they make sense (interleaved and ZB-H1 need two
devices or more, interleaved needs K x chunks layer calls); and the three recompute modes.
Configurations are ranked by predicted step time among those that fit the memory budget,
then by peak memory (per device; summed over devices that share one processor) and
simplicity (fewer stages, fewer micro-batches); those that do not fit
follow, smallest peak first, so `plan.configs[:3]` are always the three best runnable ones.
Every configuration maps one-to-one onto `Pipeline` options (`PlanConfig.kwargs`), so what
the planner predicts is what `tfpipe.fit` runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tfpipe.balance.solve import solve
from tfpipe.errors import PipelineError
from tfpipe.planner.costs import (
    LOCAL_BANDWIDTH,
    RECOMPUTE_MODES,
    REMOTE_BANDWIDTH,
    CostModel,
    format_bytes,
)
from tfpipe.planner.profile import Profile
from tfpipe.schedules import GENERATORS, Simulation

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
"""The schedules the planner tries, in the order ties are broken."""

MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
"""The micro-batch counts the planner tries (those up to the batch size)."""


@dataclass(frozen=True)
class PlanConfig:
    """One pipeline configuration and its predicted cost.

    Attributes:
        stages: K, the number of devices the model is spread over.
        balance: layer calls per model piece, `stages * chunks` entries.
        micro_batches: M, micro-batches per step.
        schedule: `"gpipe"`, `"1f1b"`, `"interleaved"` or `"zb-h1"`.
        recompute: `"never"`, `"except_last"` or `"always"`.
        chunks: model pieces per device (more than 1 only for `"interleaved"`).
        devices: the K devices, in stage order.
        batch_size: B, samples per step the prediction is for.
        micro_batch_size: `ceil(B / M)`, the size the layer times were measured at.
        step_time: predicted seconds per training step.
        bubble: predicted idle share of the devices' time, 0..1.
        peak_bytes: predicted peak bytes per device (parameters, gradients, optimizer slots
            and activations in flight).
        fits: whether every device's peak is within the memory budget (True without one).
        balanced_by: `"time"` or `"memory"`: which profiled cost `balance` equalises.

    Example:
        >>> best = tfpipe.plan(model, x[:256]).best
        >>> tfpipe.fit(model, x, y, batch_size=256, **best.kwargs())
    """

    stages: int
    balance: tuple[int, ...]
    micro_batches: int
    schedule: str
    recompute: str
    chunks: int
    devices: tuple[str, ...]
    batch_size: int
    micro_batch_size: int
    step_time: float
    bubble: float
    peak_bytes: tuple[float, ...]
    fits: bool
    balanced_by: str

    @property
    def peak_memory(self) -> float:
        """The largest predicted peak over the devices, in bytes."""
        return max(self.peak_bytes)

    @property
    def samples_per_second(self) -> float:
        """Predicted throughput: `batch_size / step_time`."""
        return self.batch_size / self.step_time if self.step_time > 0 else float("inf")

    def kwargs(self) -> dict[str, Any]:
        """The `Pipeline` / `tfpipe.fit` options of this configuration, devices excepted.

        Returns:
            `stages`, `balance`, `micro_batches`, `schedule`, `recompute` and, for
            interleaved schedules, `chunks`. Pass `devices=` yourself (any list whose first
            `stages` entries are `self.devices`), or use `tfpipe.fit(..., plan=config)`,
            which passes `self.devices` too.

        Example:
            >>> tfpipe.fit(model, x, y, batch_size=64, **config.kwargs(), devices=devices)
        """
        out: dict[str, Any] = {
            "stages": self.stages,
            "balance": list(self.balance),
            "micro_batches": self.micro_batches,
            "schedule": self.schedule,
            "recompute": self.recompute,
        }
        if self.chunks > 1:
            out["chunks"] = self.chunks
        return out

    def describe(self) -> str:
        """The configuration as `tfpipe.fit` keywords, for messages."""
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs().items())


class Plan:
    """Ranked pipeline configurations for one model, batch size and set of devices.

    Attributes:
        configs: every configuration tried, best first: those that fit the memory budget
            by predicted step time, then those that do not, by peak memory.
        profile: the measured `Profile` the predictions come from.
        cost_model: the `CostModel` that made them (to re-simulate a configuration).
        memory_budget: bytes per device, or None.
        model_name: the model's name, for the table.
        devices: the devices planned for.

    Example:
        >>> plan = tfpipe.plan(model, x[:256], memory_budget="2GiB")
        >>> print(plan)                      # the ranked table
        >>> plan.plot("best.png")            # the best configuration's predicted timeline
        >>> tfpipe.fit(model, x, y, batch_size=256, plan=plan.best)
    """

    def __init__(
        self,
        configs: Sequence[PlanConfig],
        profile: Profile,
        cost_model: CostModel,
        memory_budget: float | None,
        model_name: str,
        devices: Sequence[str] = (),
    ) -> None:
        self.configs = tuple(configs)
        self.devices = tuple(devices)
        self.profile = profile
        self.cost_model = cost_model
        self.memory_budget = memory_budget
        self.model_name = model_name

    @property
    def best(self) -> PlanConfig:
        """The fastest configuration that fits the budget."""
        return self.configs[0]

    @property
    def fitting(self) -> tuple[PlanConfig, ...]:
        """The configurations that fit the memory budget, best first."""
        return tuple(c for c in self.configs if c.fits)

    def simulation(self, config: PlanConfig | None = None) -> Simulation:
        """The simulated step of `config` (default the best): timeline in seconds per action.

        Args:
            config: one of `self.configs`.

        Returns:
            The `tfpipe.schedules.Simulation`, for example to compare with a measured
            `Pipeline.timeline()` (which is in milliseconds).
        """
        c = config if config is not None else self.best
        return self.cost_model.estimate(
            c.balance, c.micro_batches, c.schedule, c.chunks, c.recompute
        ).simulation

    def table(self, top: int | None = 10) -> str:
        """The ranked configurations as a text table.

        Args:
            top: how many rows to show; None for all.

        Returns:
            A header line (model, batch, devices, measured sizes, budget) and one row per
            configuration: rank, stages, micro-batches, schedule, recompute, balance,
            predicted step time, samples per second, bubble, peak bytes per device, and
            whether it fits.
        """
        first = self.configs[0] if self.configs else None
        budget = "none" if self.memory_budget is None else format_bytes(self.memory_budget)
        lines = [
            f"Plan for {self.model_name!r}: batch {self.cost_model.batch_size} on up to "
            f"{len(self.devices)} devices, {len(self.configs)} configurations, "
            f"{len(self.fitting)} within the memory budget ({budget} per device)",
            f"profiled on {self.profile.device} at micro-batch sizes "
            f"{', '.join(str(s) for s in self.profile.sizes)}; "
            + _transfer_text(self.cost_model)
            + (
                "; step overhead " + ", ".join(f"{t * 1e3:.2f}" for t in overhead)
                + " ms on 1.." + str(len(overhead)) + " devices"
                if (overhead := self.cost_model.step_overhead) else ""
            )
            + ("" if self.cost_model.parallel else
               "; devices share one processor (step >= all work)"),
        ]
        header = ["#", "K", "M", "schedule", "recompute", "balance", "step ms", "samples/s",
                  "bubble", "peak/device", "fits"]
        rows = [header]
        shown = self.configs if top is None else self.configs[:top]
        for n, c in enumerate(shown, 1):
            sched = c.schedule + (f" x{c.chunks}" if c.chunks > 1 else "")
            rows.append([
                str(n), str(c.stages), str(c.micro_batches), sched, c.recompute,
                "[" + ",".join(str(b) for b in c.balance) + "]", f"{c.step_time * 1e3:.3f}",
                f"{c.samples_per_second:,.0f}", f"{100 * c.bubble:.1f}%",
                format_bytes(c.peak_memory), "yes" if c.fits else "no",
            ])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        numeric = {0, 1, 2, 6, 7, 8, 9}
        for n, row in enumerate(rows):
            lines.append("  ".join(
                cell.rjust(w) if i in numeric else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths))
            ).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        if top is not None and len(self.configs) > top:
            lines.append(f"... {len(self.configs) - top} more (plan.table(top=None) lists all)")
        if first is not None:
            lines.append(f"best: tfpipe.fit(model, ..., {first.describe()}, "
                         f"devices={list(first.devices)!r})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (
            f"Plan({self.model_name!r}, {len(self.configs)} configs, "
            f"best={self.best.describe() if self.configs else None})"
        )

    def plot(self, path: str | os.PathLike[str], config: PlanConfig | None = None) -> str:
        """Draws the predicted timeline of `config` (default the best) as a PNG.

        Args:
            path: where to write the PNG; missing parent folders are created.
            config: one of `self.configs`.

        Returns:
            `path`, as a string.

        Raises:
            ImportError: if matplotlib is not installed (`pip install 'tfpipe[plot]'`).
        """
        from tfpipe.schedules.plot import plot

        c = config if config is not None else self.best
        sim = self.simulation(c)
        rows = [(r, a, start * 1e3, end * 1e3) for r, a, start, end in sim.timeline]
        sched = c.schedule + (f" x{c.chunks}" if c.chunks > 1 else "")
        title = (
            f"{self.model_name}: {sched}, K={c.stages}, M={c.micro_batches}, recompute "
            f"{c.recompute}; predicted step {c.step_time * 1e3:.3g} ms, bubble "
            f"{100 * c.bubble:.1f}%; time in ms"
        )
        return plot(rows, path, title=title)


def _transfer_text(model: CostModel) -> str:
    """The header's words for what a hop between devices costs."""
    bandwidth = ("bandwidth not limiting" if math.isinf(model.bandwidth)
                 else f"bandwidth {model.bandwidth / 1e9:.3g} GB/s")
    latency = f" + {model.latency * 1e3:.2g} ms per hop" if model.latency else ""
    return f"{bandwidth}{latency} between devices"


def default_bandwidth(devices: Sequence[str]) -> float:
    """`REMOTE_BANDWIDTH` when a device is on a TensorFlow worker (`/job:...`, not localhost),
    else `LOCAL_BANDWIDTH`, in bytes per second."""
    remote = any("/job:" in d and "/job:localhost" not in d for d in devices)
    return REMOTE_BANDWIDTH if remote else LOCAL_BANDWIDTH


def default_parallel(devices: Sequence[str]) -> bool:
    """False when several of `devices` are logical CPU devices of this process (they share its
    thread pool and take turns), else True."""
    local_cpus = [d for d in devices if ("/job:" not in d or "/job:localhost" in d) and "CPU" in d]
    return len(set(local_cpus)) < 2


def search(
    profile: Profile,
    batch_size: int,
    devices: Sequence[str],
    *,
    memory_budget: float | None = None,
    stages: int | Sequence[int] | None = None,
    micro_batches: Sequence[int] = MICRO_BATCHES,
    schedules: Sequence[str] = SCHEDULES,
    recompute: Sequence[str] = RECOMPUTE_MODES,
    chunks: int = 2,
    bandwidth: float | None = None,
    parallel: bool | None = None,
    model_name: str = "model",
    step_overhead: Sequence[float] = (),
    transfer_latency: float = 0.0,
) -> Plan:
    """Predicts and ranks every configuration of a profiled model (no TensorFlow work).

    Args:
        profile: the model's measured `Profile`; it must hold times at every micro-batch
            size `ceil(batch_size / M)` to be exact (others are interpolated).
        batch_size: B, samples per training step.
        devices: the devices to spread the model over; K stages use the first K.
        memory_budget: bytes per device; configurations above it are ranked after the
            others and marked as not fitting. None: no limit.
        stages: the stage counts K to try (default 1 to `len(devices)`).
        micro_batches: the micro-batch counts M to try; those above B are skipped.
        schedules: the schedule names to try.
        recompute: the recompute modes to try.
        chunks: model pieces per device for `"interleaved"` (at least 2).
        bandwidth: bytes per second between devices; default `default_bandwidth(devices)`.
        parallel: whether the devices compute at the same time; default
            `default_parallel(devices)` (False for logical CPU devices, whose predicted step
            is then at least the sum of all their work).
        model_name: the name shown in the table.
        step_overhead: seconds each step pays whatever it computes, per number of devices
            used (entry K-1 for K devices), as `tfpipe.planner.profile.measure_dispatch`
            measures them. Default: none.
        transfer_latency: seconds each hop between devices pays whatever its size, as
            `tfpipe.planner.profile.measure_transfer` measures it. Default 0.

    Returns:
        The `Plan`, ranked.

    Raises:
        PipelineError: for arguments that allow no configuration, or when a memory budget
            is given and no configuration fits it (the message names the smallest peak).
    """
    devices = list(devices)
    n = profile.num_layers
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PipelineError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if not devices:
        raise PipelineError("devices is empty: give at least one device to plan for.")
    stage_counts = _stage_counts(stages, len(devices), n)
    counts = sorted({m for m in micro_batches if 1 <= m <= batch_size})
    if not counts:
        raise PipelineError(
            f"No micro-batch count in micro_batches={list(micro_batches)} is between 1 and the "
            f"batch size {batch_size}: include 1, or plan for a larger batch."
        )
    unknown = [s for s in schedules if s not in GENERATORS]
    if unknown or not schedules:
        raise PipelineError(
            f"schedules={list(schedules)}: give names from {sorted(GENERATORS)}."
        )
    bad = [r for r in recompute if r not in RECOMPUTE_MODES]
    if bad or not recompute:
        raise PipelineError(f"recompute={list(recompute)}: give modes from {RECOMPUTE_MODES}.")
    if not isinstance(chunks, int) or chunks < 2:
        raise PipelineError(f"chunks must be an integer >= 2 for 'interleaved', got {chunks!r}.")
    model = CostModel(
        profile,
        batch_size,
        bandwidth or default_bandwidth(devices),
        default_parallel(devices) if parallel is None else parallel,
        step_overhead,
        transfer_latency,
    )
    found: list[PlanConfig] = []
    for k in stage_counts:
        for sched in schedules:
            v = chunks if sched == "interleaved" else 1
            if k == 1 and sched in ("interleaved", "zb-h1") or k * v > n:
                continue  # no bubble to fill on one device; too few layer calls to cut
            for m in counts:
                size = model.micro_batch_size(m)
                for by, bal in _balances(profile, k * v, size):
                    for mode in recompute:
                        if k * v == 1 and mode == "except_last":
                            continue  # the one stage is the last: same as "never"
                        est = model.estimate(bal, m, sched, v, mode)
                        peak = max(est.peak_bytes)
                        found.append(PlanConfig(
                            stages=k, balance=tuple(bal), micro_batches=m, schedule=sched,
                            recompute=mode, chunks=v, devices=tuple(devices[:k]),
                            batch_size=batch_size, micro_batch_size=size,
                            step_time=est.step_time,
                            bubble=est.simulation.bubble_fraction,
                            peak_bytes=est.peak_bytes,
                            fits=memory_budget is None or peak <= memory_budget,
                            balanced_by=by,
                        ))
    if not found:
        raise PipelineError(
            f"No configuration to try: stages={stage_counts}, schedules={list(schedules)} and "
            f"{n} layer calls allow none. Include 'gpipe' or '1f1b' in schedules."
        )
    order = {name: i for i, name in enumerate(SCHEDULES)}
    modes = {name: i for i, name in enumerate(RECOMPUTE_MODES)}

    def rank(c: PlanConfig) -> tuple[Any, ...]:
        # Devices sharing one processor share its memory too: break ties on the total.
        memory = c.peak_memory if model.parallel else sum(c.peak_bytes)
        speed = (float(f"{c.step_time:.6g}"), memory) if c.fits else (c.peak_memory, 0.0)
        return (not c.fits, *speed, c.stages, c.micro_batches, order.get(c.schedule, 99),
                modes[c.recompute], c.balanced_by)

    found.sort(key=rank)
    plan = Plan(found, profile, model, memory_budget, model_name, devices)
    if memory_budget is not None and not found[0].fits:
        low = found[0]
        raise PipelineError(
            f"No configuration fits memory_budget={format_bytes(memory_budget)} per device: the "
            f"smallest peak found is {format_bytes(low.peak_memory)} ({low.describe()}, on "
            f"{low.stages} device(s)). Raise memory_budget to at least that, plan for more "
            "devices, a smaller batch, or more micro-batches (micro_batches=[..., 64])."
        )
    return plan


def _stage_counts(stages: int | Sequence[int] | None, num_devices: int, n: int) -> list[int]:
    if stages is None:
        wanted = list(range(1, num_devices + 1))
    else:
        wanted = [stages] if isinstance(stages, int) else list(stages)
    bad = [k for k in wanted if not isinstance(k, int) or isinstance(k, bool) or k < 1]
    too_many = [k for k in wanted if k not in bad and k > num_devices]
    if bad or too_many or not wanted:
        raise PipelineError(
            f"stages={stages!r}: give stage counts between 1 and the {num_devices} devices "
            "planned for (one stage per device)."
        )
    usable = sorted({k for k in wanted if k <= n})
    if not usable:
        raise PipelineError(
            f"stages={stages!r}: the model has only {n} layer calls; use stages <= {n}."
        )
    return usable


def _balances(profile: Profile, parts: int, size: int) -> list[tuple[str, list[int]]]:
    """The time-balanced split at this micro-batch size, and the memory-balanced one if it
    differs."""
    times = solve(profile.layer_seconds(size), parts)
    memory = solve(
        [s + a * size for s, a in zip(profile.state_bytes, profile.activation_bytes)], parts
    )
    return [("time", times)] + ([("memory", memory)] if memory != times else [])
