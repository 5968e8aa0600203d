"""The planner's search: every stage count, split, micro-batch count, schedule and recompute mode.

Design: the search is exhaustive over a small space rather than clever, because each
candidate costs one simulation of at most a few hundred actions (`CostModel.estimate`, pure
Python): stage counts 1..len(devices), for each the optimal contiguous split
(`tfpipe.balance.solve`) of the layer times measured at that micro-batch size and, when it
differs, of the layer bytes; micro-batch counts from a small divisor-friendly set up to the
batch size; the built-in schedules where they make sense (all but GPipe and 1F1B need two
devices or more, those with several chunks per device K x chunks layer calls, `dualpipe-v`
2K micro-batches or more: `tfpipe.schedules.min_micro_batches`); and the three recompute
modes.
Configurations are ranked by predicted step time among those that fit the memory budget,
then by peak memory (per device; summed over devices that share one processor) and
simplicity (fewer stages, fewer micro-batches); those that do not fit
follow, smallest peak first, so `plan.configs[:3]` are always the three best that fit.
`PlanConfig` and `Plan`, the result types, live in `tfpipe.planner.result` (importable
from here too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tfpipe.balance.solve import solve
from tfpipe.errors import PipelineError
from tfpipe.options import RECOMPUTE_MODES
from tfpipe.planner.costs import (
    LOCAL_BANDWIDTH,
    REMOTE_BANDWIDTH,
    CostModel,
    format_bytes,
)
from tfpipe.planner.records import Profile
from tfpipe.planner.result import Plan as Plan
from tfpipe.planner.result import PlanConfig as PlanConfig
from tfpipe.schedules import (
    DEFAULT_CHUNKS,
    FIXED_CHUNKS,
    GENERATORS,
    default_chunks,
    min_micro_batches,
)

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "looped-bfs", "zb-v", "interleaved-zb",
             "dualpipe-v")
"""The schedules the planner tries by default, in the order ties are broken."""

MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
"""The micro-batch counts the planner tries (those up to the batch size)."""


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
    schedules: Sequence[str] | None = None,
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
        schedules: the schedule names to try (default `SCHEDULES`).
        recompute: the recompute modes to try.
        chunks: model pieces per device for `"interleaved"`, `"looped-bfs"` and
            `"interleaved-zb"`, at least 2 (`"zb-v"` and `"dualpipe-v"` always hold 2).
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
    if schedules is None:
        schedules = list(SCHEDULES)
    stage_counts, counts = _search_space(
        n, batch_size, devices, stages, micro_batches, schedules, recompute, chunks
    )
    model = CostModel(
        profile,
        batch_size,
        bandwidth or default_bandwidth(devices),
        default_parallel(devices) if parallel is None else parallel,
        step_overhead,
        transfer_latency,
    )
    found = _configs(
        model, devices, stage_counts, counts, schedules, recompute, chunks, memory_budget
    )
    if not found:
        raise PipelineError(
            f"No configuration to try: stages={stage_counts}, schedules={list(schedules)}, "
            f"micro_batches={counts} and {n} layer calls allow none. Include 'gpipe' or "
            "'1f1b' in schedules."
        )
    found.sort(key=lambda c: _rank(c, model.parallel))
    plan = Plan(found, profile, model, memory_budget, model_name, devices)
    _check_fits(found[0], memory_budget)
    return plan


def _configs(
    model: CostModel,
    devices: Sequence[str],
    stage_counts: Sequence[int],
    counts: Sequence[int],
    schedules: Sequence[str],
    recompute: Sequence[str],
    chunks: int,
    memory_budget: float | None,
) -> list[PlanConfig]:
    """Every configuration worth simulating, each simulated, in the order they are tried."""
    n = model.profile.num_layers
    found: list[PlanConfig] = []
    for k in stage_counts:
        for sched in schedules:
            fixed = default_chunks(sched) == 1 or sched in FIXED_CHUNKS
            v = default_chunks(sched) if fixed else chunks
            if k == 1 and sched not in ("gpipe", "1f1b") or k * v > n:
                continue  # no bubble to fill on one device; too few layer calls to cut
            for m in counts:
                if m < min_micro_batches(sched, k):
                    continue  # dualpipe-v: at least 2 micro-batches per device
                size = model.micro_batch_size(m)
                for by, bal in _balances(model.profile, k * v, size):
                    for mode in recompute:
                        if k * v == 1 and mode == "except_last":
                            continue  # the one stage is the last: same as "never"
                        est = model.estimate(bal, m, sched, v, mode)
                        peak = max(est.peak_bytes)
                        found.append(PlanConfig(
                            stages=k, balance=tuple(bal), micro_batches=m, schedule=sched,
                            recompute=mode, chunks=v, devices=tuple(devices[:k]),
                            batch_size=model.batch_size, micro_batch_size=size,
                            step_time=est.step_time,
                            bubble=est.simulation.bubble_fraction,
                            peak_bytes=est.peak_bytes,
                            fits=memory_budget is None or peak <= memory_budget,
                            balanced_by=by,
                        ))
    return found


_SCHEDULE_ORDER = {name: i for i, name in enumerate(SCHEDULES)}
_MODE_ORDER = {name: i for i, name in enumerate(RECOMPUTE_MODES)}


def _rank(c: PlanConfig, parallel: bool) -> tuple[Any, ...]:
    """The sort key: fitting ones by step time, then the rest by peak; ties to the simplest."""
    # Devices sharing one processor share its memory too: break ties on the total.
    memory = c.peak_memory if parallel else sum(c.peak_bytes)
    speed = (float(f"{c.step_time:.6g}"), memory) if c.fits else (c.peak_memory, 0.0)
    return (not c.fits, *speed, c.stages, c.micro_batches, _SCHEDULE_ORDER.get(c.schedule, 99),
            _MODE_ORDER[c.recompute], c.balanced_by)


def _check_fits(low: PlanConfig, memory_budget: float | None) -> None:
    """Raises when a budget is given and even the best-ranked configuration, `low`, is above
    it (it then has the smallest peak)."""
    if memory_budget is not None and not low.fits:
        raise PipelineError(
            f"No configuration fits memory_budget={format_bytes(memory_budget)} per device: the "
            f"smallest peak found is {format_bytes(low.peak_memory)} ({low.describe()}, on "
            f"{low.stages} device(s)). Raise memory_budget to at least that, plan for more "
            "devices, a smaller batch, or more micro-batches (micro_batches=[..., 64])."
        )


def _search_space(
    n: int,
    batch_size: int,
    devices: Sequence[str],
    stages: int | Sequence[int] | None,
    micro_batches: Sequence[int],
    schedules: Sequence[str],
    recompute: Sequence[str],
    chunks: int,
) -> tuple[list[int], list[int]]:
    """Checks `search`'s ranges of options; returns the stage and micro-batch counts to try."""
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
        several = ", ".join(repr(name) for name in DEFAULT_CHUNKS if name not in FIXED_CHUNKS)
        raise PipelineError(f"chunks must be an integer >= 2 for {several}, got {chunks!r}.")
    return stage_counts, counts


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
