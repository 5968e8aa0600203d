"""`tfpipe.fit` / `evaluate` / `predict`: one-call pipelined versions of the Keras methods.

Design: each turns its pipeline arguments (or a planned configuration) into one checked
`tfpipe.options.PipelineOptions`, builds the `Pipeline` for it and calls its Keras-signature
method; the only work of its own is building a Sequential model that has no input shape yet,
from the first element of the data, the way `model.fit` would on its first batch
(`tfpipe.data`). A device or worker that runs out of memory (placing the weights, or in a
step) ends the call with `WorkerOutOfMemoryError`: `Pipeline` builds and runs inside
`tfpipe.oom.memory_errors`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras

from tfpipe._keras import cache_on, cached_on, compile_key
from tfpipe.data import build_from_data, first_inputs
from tfpipe.errors import PipelineError
from tfpipe.options import PipelineOptions
from tfpipe.partition.flatten import is_graph_model
from tfpipe.pipeline import Pipeline
from tfpipe.planner.search import PlanConfig
from tfpipe.schedules import Schedule


def fit(
    model: keras.Model,
    x: Any = None,
    y: Any = None,
    *,
    batch_size: int | None = None,
    epochs: int = 1,
    stages: int | None = None,
    balance: str | Sequence[int] | None = None,
    micro_batches: int = 1,
    devices: Sequence[str] | None = None,
    schedule: str | Schedule = "gpipe",
    chunks: int | None = None,
    split_points: Sequence[str] | None = None,
    recompute: str | Sequence[str | bool] = "never",
    check_numerics: bool = False,
    replicas: int = 1,
    batch_norm: str = "micro-batch",
    jit_compile: bool | str = "auto",
    rank_loops: bool | str = "auto",
    callbacks: list[keras.callbacks.Callback] | None = None,
    validation_data: Any = None,
    verbose: str | int = "auto",
    steps_per_epoch: int | None = None,
    plan: PlanConfig | None = None,
    **fit_kwargs: Any,
) -> keras.callbacks.History:
    """Trains a compiled Keras model pipelined across devices; the result equals `model.fit`.

    Args:
        model: a compiled Keras model (built, or buildable from `x`): Sequential,
            Functional (nested models read through) or subclassed (its `call` traced).
        x: a `tf.data.Dataset` of `(x, y)` or `(x, y, sample_weight)` batches, or NumPy
            arrays / tensors with `y` and `batch_size`, as for `model.fit`.
        y: targets when `x` is an array.
        batch_size: samples per batch for array inputs (Keras default 32).
        epochs: number of epochs.
        stages: number of pipeline stages K (see `Pipeline`).
        balance: `"params"` (default), `"time"` or `"memory"` (profiled on the first batch of
            `x`), or layer calls per stage instead of `stages`.
        micro_batches: M; each batch of B samples becomes M micro-batches of about B/M.
        devices: device names per stage; default the GPUs, else the logical CPU devices.
        schedule: `"gpipe"`, `"1f1b"`, `"interleaved"`, `"zb-h1"`, `"looped-bfs"`, `"zb-v"`,
            `"interleaved-zb"`, `"dualpipe-v"` or a `tfpipe.schedules.Schedule`.
        chunks: model pieces per device for `"interleaved"`, `"looped-bfs"`,
            `"interleaved-zb"` (default 2) and `"zb-v"`, `"dualpipe-v"` (2).
        split_points: layer names where a new stage starts, instead of `stages`/`balance`.
        recompute: `"never"`, `"except_last"`, `"always"` or one flag per stage: recompute a
            stage's forward in its backward instead of keeping its activations.
        check_numerics: stop at the first NaN/Inf, naming the stage, layer and pass.
        replicas: R data-parallel copies of the pipeline on R*K devices (see `Pipeline`);
            each stage's gradients are all-reduced over its copies before the one update.
        batch_norm: `"micro-batch"` (default) or `"deferred"`: BatchNormalization's moving
            statistics updated per micro-batch, or once per batch as a full batch would.
        jit_compile: `"auto"` (default: XLA on each stage when the model's own
            `jit_compile` is True, as `model.compile`'s default makes it on a GPU machine),
            `True` (XLA on each stage's forward and backward, on its device) or `False`.
        rank_loops: `"auto"` (default: the steady phase as one in-graph loop where it runs
            every feature asked for, XLA off, stages in one process, else unrolled),
            `"steady"`, `True` (one loop per device) or `False` (unrolled); see `Pipeline`.
        callbacks, validation_data, verbose, steps_per_epoch, **fit_kwargs: as `model.fit`.
        plan: a `tfpipe.planner.PlanConfig` (for example `tfpipe.plan(...).best`): its
            `stages`, `balance`, `micro_batches`, `schedule`, `recompute`, `chunks` and
            `devices`, exactly as if given one by one. `devices=` may still override its
            devices; any other pipeline argument given with it must agree with it.

    Returns:
        The `keras.callbacks.History` of the run, with `history.pipeline` the `Pipeline`
        that ran it (for `history.pipeline.summary()`); the trained weights are in `model`.

    Raises:
        PipelineError: for arguments or models that cannot be pipelined as asked.
        WorkerOutOfMemoryError: when a stage's device or worker ran out of memory (a GPU's
            `ResourceExhaustedError`, or a worker the kernel killed for memory), naming it,
            its stages and the fix; TensorFlow's error is its `__cause__`.

    Example:
        >>> tfpipe.configure_cpu_devices(4)
        >>> model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        >>> history = tfpipe.fit(model, dataset, epochs=3, stages=4, micro_batches=8)
    """
    options = _options(
        plan,
        stages=stages,
        balance=balance,
        micro_batches=micro_batches,
        schedule=schedule,
        chunks=chunks,
        split_points=split_points,
        recompute=recompute,
        devices=devices,
        check_numerics=check_numerics,
        replicas=replicas,
        batch_norm=batch_norm,
        jit_compile=jit_compile,
        rank_loops=rank_loops,
    )
    build_from_data(model, x)
    sampled = options.balance_mode in ("time", "memory") or not is_graph_model(model)
    pipe = pipeline_for(
        model, lambda: first_inputs(x, batch_size) if sampled else None, options, "fit"
    )
    history = pipe.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=epochs,
        callbacks=callbacks,
        validation_data=validation_data,
        verbose=verbose,
        steps_per_epoch=steps_per_epoch,
        **fit_kwargs,
    )
    history.pipeline = pipe  # the stages, schedule and summary() of this run
    return history


def _options(plan: PlanConfig | None, **given: Any) -> PipelineOptions:
    """The checked options of `tfpipe.fit`: those given, or the plan's with those given."""
    if plan is None:
        return PipelineOptions(**given)
    if not isinstance(plan, PlanConfig):
        raise PipelineError(
            f"plan={plan!r} is not a planned configuration: pass one of tfpipe.plan(...).configs, "
            "for example plan.best."
        )
    return plan.options(**given)


def evaluate(
    model: keras.Model,
    x: Any = None,
    y: Any = None,
    *,
    stages: int | None = None,
    balance: Sequence[int] | None = None,
    micro_batches: int = 1,
    devices: Sequence[str] | None = None,
    **kwargs: Any,
) -> Any:
    """Evaluates pipelined; arguments as `model.evaluate` plus the pipeline's."""
    pipe = _inference_pipeline(model, x, stages, balance, micro_batches, devices)
    return pipe.evaluate(x, y, **kwargs)


def predict(
    model: keras.Model,
    x: Any,
    *,
    stages: int | None = None,
    balance: Sequence[int] | None = None,
    micro_batches: int = 1,
    devices: Sequence[str] | None = None,
    **kwargs: Any,
) -> Any:
    """Predicts pipelined; arguments as `model.predict` plus the pipeline's."""
    pipe = _inference_pipeline(model, x, stages, balance, micro_batches, devices)
    return pipe.predict(x, **kwargs)


def _inference_pipeline(
    model: keras.Model,
    x: Any,
    stages: int | None,
    balance: Sequence[int] | None,
    micro_batches: int,
    devices: Sequence[str] | None,
) -> Pipeline:
    build_from_data(model, x)
    options = PipelineOptions(
        stages=stages, balance=balance, micro_batches=micro_batches, devices=devices
    )
    sampled = not is_graph_model(model) and x is not None
    return pipeline_for(
        model, lambda: first_inputs(x, None) if sampled else None, options, "inference"
    )


def pipeline_for(
    model: keras.Model, sample: Callable[[], Any], options: PipelineOptions, caller: str
) -> Pipeline:
    """The `Pipeline` of `model` for these options, reused from the last call when they match.

    Reusing it keeps its traced step: a second `tfpipe.fit` neither traces again nor builds
    new stage sub-models (each trace would otherwise stay in TensorFlow's gradient registry
    for the life of the process). Recompiling the model (a new optimizer, loss or metrics)
    makes a new pipeline. The cache lives on the model, so it goes when the model goes.

    Args:
        model: the built Keras model.
        sample: returns the batch of inputs `balance="time"` / `"memory"` profile on (called
            only when a new pipeline is built).
        options: the checked options.
        caller: `"fit"` or `"inference"`: a pipeline is reused only by the same kind of call.
    """
    key = (
        id(model.optimizer) if getattr(model, "optimizer", None) is not None else None,
        *compile_key(model),
        caller,
        repr(sorted((k, _hashable(v)) for k, v in options.kwargs().items())),
    )
    cached = cached_on(model)
    if cached is not None and cached[0] == key:
        reused: Pipeline = cached[1]
        return reused
    pipe = Pipeline.from_options(model, options, sample=sample())
    cache_on(model, (key, pipe))
    return pipe


def _hashable(value: Any) -> Any:
    if isinstance(value, Schedule):
        return ("schedule", id(value))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value
