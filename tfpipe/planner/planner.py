"""`tfpipe.plan`: measure a model on its devices, then predict and rank pipeline configurations.

Design: planning is two steps with a plain-data seam between them. `measure_profile` does the
only TensorFlow work (each layer call timed at every micro-batch size the search will
consider, on the first target device); `search` then predicts every configuration with the
schedule simulator and ranks them, in pure Python. The result, a `Plan`, holds configurations
that are exactly `Pipeline` options, so `tfpipe.fit(..., plan=plan.best)` trains what was
predicted, through the same code path as hand-written options.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from tfpipe.data import build_from_data, first_inputs
from tfpipe.devices import default_devices, is_local, resolve_devices
from tfpipe.errors import PipelineError
from tfpipe.options import RECOMPUTE_MODES
from tfpipe.planner.costs import parse_bytes
from tfpipe.planner.profile import measure_dispatch, measure_profile, measure_transfer
from tfpipe.planner.search import MICRO_BATCHES, Plan, default_parallel, search


def plan(
    model: keras.Model,
    sample_batch: Any,
    devices: Sequence[str] | None = None,
    memory_budget: float | str | None = None,
    *,
    stages: int | Sequence[int] | None = None,
    micro_batches: Sequence[int] = MICRO_BATCHES,
    schedules: Sequence[str] | None = None,
    recompute: Sequence[str] = RECOMPUTE_MODES,
    chunks: int = 2,
    bandwidth: float | None = None,
    parallel: bool | None = None,
    profile_sizes: Sequence[int] | None = None,
    repeats: int = 5,
) -> Plan:
    """Picks stages, split, micro-batches, schedule and recomputation for a model.

    Profiles every layer call's forward + backward time on `devices[0]` at each micro-batch
    size `ceil(B / M)` it considers (small micro-batches cost more per sample than a linear
    share of the batch), plus parameter, optimizer-slot and activation bytes; then predicts
    the step time and per-device peak memory of every configuration with the schedule
    simulator (`tfpipe.schedules.simulate`) and ranks them. The model's weights are not
    changed; its optimizer is built if it was not (to count its slots).

    Args:
        model: a compiled Sequential or Functional Keras model (built, or buildable from
            `sample_batch`). Uncompiled models are planned without optimizer slots.
        sample_batch: one batch of inputs, structured like the model's input (an array, a
            list or a dict of arrays), whose leading dimension is the training batch size B;
            or a `tf.data.Dataset`, whose first batch's inputs are used.
        devices: the devices to plan for; K stages use the first K. Default
            `tfpipe.default_devices()` (the GPUs, else the logical CPU devices).
        memory_budget: bytes per device, as a number or a text such as `"2GiB"`.
            Configurations above it are ranked after the others, marked as not fitting.
        stages: the stage counts K to try (default 1 to `len(devices)`).
        micro_batches: the micro-batch counts M to try (those up to B).
        schedules: the schedules to try (default `tfpipe.planner.SCHEDULES`).
        recompute: the recomputation modes to try.
        chunks: model pieces per device for `"interleaved"`, `"looped-bfs"` and
            `"interleaved-zb"` (`"zb-v"` and `"dualpipe-v"` always hold 2).
        bandwidth: bytes per second between devices, for the per-hop transfer time of the
            activation crossing each cut. Default: measured between the first two devices,
            with each hop's fixed latency (`tfpipe.planner.profile.measure_transfer`); the
            latency is measured and added in either case.
        parallel: whether the devices compute at the same time. Default: False for logical
            CPU devices (`tfpipe.configure_cpu_devices`), which share one thread pool, and for
            logical GPUs split from one physical GPU, so their predicted step is the sum of
            all their work; True otherwise.
        profile_sizes: micro-batch sizes to measure instead of every size considered; the
            others are interpolated (`Profile.layer_seconds`). Fewer sizes plan faster.
        repeats: timed runs per layer call and size (the median is kept).

    Returns:
        The `Plan`: `plan.configs` ranked best first, `plan.best`, `plan.table()` (also
        `str(plan)`), `plan.plot(path)`, and `plan.best.kwargs()` for `tfpipe.fit`.

    Raises:
        PipelineError: for a model tfpipe cannot split, devices that do not exist, an empty
            search, or a `memory_budget` that no configuration fits (naming the smallest
            peak found and what to change).

    Example:
        >>> tfpipe.configure_cpu_devices(4)
        >>> plan = tfpipe.plan(model, x[:256], memory_budget="2GiB")
        >>> print(plan)
        >>> history = tfpipe.fit(model, x, y, batch_size=256, epochs=3, plan=plan.best)
    """
    if isinstance(sample_batch, tf.data.Dataset):
        sample_batch = first_inputs(sample_batch, None)
    if not isinstance(model, keras.Model):
        raise PipelineError(f"tfpipe.plan needs a keras.Model, got {type(model).__name__}.")
    build_from_data(model, sample_batch)
    if not model.built:
        raise PipelineError(
            f"Model {model.name!r} is not built: start it with keras.Input(shape=...) or call "
            "model.build(input_shape) before planning."
        )
    leaves = keras.tree.flatten(sample_batch)
    if not leaves or len(getattr(leaves[0], "shape", ())) == 0:
        raise PipelineError(
            f"sample_batch must be a batch of inputs (arrays with a leading batch dimension), "
            f"got {type(sample_batch).__name__}."
        )
    batch_size = int(leaves[0].shape[0])
    given = list(devices) if devices is not None else default_devices()
    names = resolve_devices(given, len(given))
    try:
        budget = None if memory_budget is None else parse_bytes(memory_budget)
    except ValueError as err:
        raise PipelineError(f"memory_budget: {err}") from None
    if profile_sizes is not None:
        sizes = sorted({int(s) for s in profile_sizes})
    else:
        sizes = sorted({-(-batch_size // m) for m in micro_batches if 1 <= m <= batch_size})
    if not sizes:
        raise PipelineError(
            f"No micro-batch count in micro_batches={list(micro_batches)} fits the batch size "
            f"{batch_size}: include 1, or plan for a larger batch."
        )
    profile = measure_profile(model, sample_batch, sizes, device=names[0], repeats=repeats)
    overhead = measure_dispatch(names, repeats=max(repeats, 5))
    latency, measured_bandwidth = measure_transfer(names, repeats=max(repeats, 5)) or (0.0, None)
    return search(
        profile,
        batch_size,
        names,
        memory_budget=budget,
        stages=stages,
        micro_batches=micro_batches,
        schedules=schedules,
        recompute=recompute,
        chunks=chunks,
        bandwidth=bandwidth or measured_bandwidth,
        parallel=_parallel(names) if parallel is None else parallel,
        model_name=model.name,
        step_overhead=overhead,
        transfer_latency=latency,
    )


def _parallel(devices: Sequence[str]) -> bool:
    """Whether `devices` compute at the same time: not when several are logical CPU devices of
    this process, or logical GPUs while there are fewer physical GPUs than logical ones."""
    if not default_parallel(devices):
        return False
    local_gpus = {d for d in devices if is_local(d) and "GPU" in d}
    physical = len(tf.config.list_physical_devices("GPU"))
    return len(local_gpus) < 2 or len(tf.config.list_logical_devices("GPU")) <= physical
