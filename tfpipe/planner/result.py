"""The planner's result: configurations with their predicted cost, ranked into a `Plan`.

Design: these are plain records of what `tfpipe.planner.search.search` predicted, kept apart
from the search so that code that only runs a plan (`tfpipe.fit(..., plan=config)`) need not
read the search. Every configuration maps one-to-one onto `Pipeline` options
(`PlanConfig.options`, a `tfpipe.options.PipelineOptions`; `PlanConfig.kwargs` as keywords), so
what the planner predicts is what `tfpipe.fit` runs; a `Plan` keeps its `CostModel` to
re-simulate any configuration (`Plan.simulation`, `Plan.plot`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tfpipe.options import PipelineOptions
from tfpipe.planner.costs import CostModel
from tfpipe.planner.records import Profile
from tfpipe.report import format_bytes, text_table
from tfpipe.schedules import Simulation
from tfpipe.schedules.plot import plot as plot_timeline


@dataclass(frozen=True)
class PlanConfig:
    """One pipeline configuration and its predicted cost.

    Attributes:
        stages: K, the number of devices the model is spread over.
        balance: layer calls per model piece, `stages * chunks` entries.
        micro_batches: M, micro-batches per step.
        schedule: a name of `tfpipe.schedules.GENERATORS` (`"gpipe"`, `"1f1b"`,
            `"interleaved"`, `"zb-h1"`, `"looped-bfs"`, `"zb-v"`, `"interleaved-zb"`,
            `"dualpipe-v"`).
        recompute: `"never"`, `"except_last"` or `"always"`.
        chunks: model pieces per device (more than 1 only for the schedules of
            `tfpipe.schedules.DEFAULT_CHUNKS`).
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
            schedules with several pieces per device, `chunks`. Pass `devices=` yourself
            (any list whose first `stages` entries are `self.devices`), or use
            `tfpipe.fit(..., plan=config)`, which passes `self.devices` too.

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

    def options(self, **given: Any) -> PipelineOptions:
        """The `PipelineOptions` of this configuration, on its devices.

        Args:
            **given: options given next to the plan, as to `tfpipe.fit(..., plan=config)`:
                `devices` (when not None) replaces `self.devices`; `profile`,
                `check_numerics` and `replicas` are yours; any of `stages`, `balance`,
                `micro_batches`, `schedule`, `chunks`, `split_points` and `recompute` must be
                at its default or equal this configuration's value.

        Returns:
            The checked options (`tfpipe.Pipeline.from_options(model, options)` builds it).

        Raises:
            PipelineError: when a given option disagrees with this configuration's.

        Example:
            >>> pipe = tfpipe.Pipeline.from_options(model, plan.best.options())
        """
        return PipelineOptions.from_plan({**self.kwargs(), "devices": self.devices}, **given)

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
        lines += text_table(rows, numeric={0, 1, 2, 6, 7, 8, 9})
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
        c = config if config is not None else self.best
        sim = self.simulation(c)
        rows = [(r, a, start * 1e3, end * 1e3) for r, a, start, end in sim.timeline]
        sched = c.schedule + (f" x{c.chunks}" if c.chunks > 1 else "")
        title = (
            f"{self.model_name}: {sched}, K={c.stages}, M={c.micro_batches}, recompute "
            f"{c.recompute}; predicted step {c.step_time * 1e3:.3g} ms, bubble "
            f"{100 * c.bubble:.1f}%; time in ms"
        )
        return plot_timeline(rows, path, title=title)


def _transfer_text(model: CostModel) -> str:
    """The header's words for what a hop between devices costs."""
    bandwidth = ("bandwidth not limiting" if math.isinf(model.bandwidth)
                 else f"bandwidth {model.bandwidth / 1e9:.3g} GB/s")
    latency = f" + {model.latency * 1e3:.2g} ms per hop" if model.latency else ""
    return f"{bandwidth}{latency} between devices"
