"""`tfpipe.fit` / `evaluate` / `predict`: one-call pipelined versions of the Keras methods.

Design: each builds a `Pipeline` and calls its Keras-signature method; the only work of its
own is building a Sequential model that has no input shape yet, from the first element of
the data, the way `model.fit` would on its first batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from tfpipe.errors import PipelineError
from tfpipe.pipeline import Pipeline
from tfpipe.schedules import Schedule

if TYPE_CHECKING:
    from tfpipe.planner import PlanConfig


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
    callbacks: list[keras.callbacks.Callback] | None = None,
    validation_data: Any = None,
    verbose: str | int = "auto",
    steps_per_epoch: int | None = None,
    plan: PlanConfig | None = None,
    **fit_kwargs: Any,
) -> keras.callbacks.History:
    """Trains a compiled Keras model pipelined across devices; the result equals `model.fit`.

    Args:
        model: a compiled Sequential or Functional model (built, or buildable from `x`).
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
        schedule: `"gpipe"`, `"1f1b"`, `"interleaved"`, `"zb-h1"` or a
            `tfpipe.schedules.Schedule`.
        chunks: model pieces per device for `"interleaved"` (default 2).
        split_points: layer names where a new stage starts, instead of `stages`/`balance`.
        recompute: `"never"`, `"except_last"`, `"always"` or one flag per stage: recompute a
            stage's forward in its backward instead of keeping its activations.
        check_numerics: stop at the first NaN/Inf, naming the stage, layer and pass.
        replicas: R data-parallel copies of the pipeline on R*K devices (see `Pipeline`);
            each stage's gradients are all-reduced over its copies before the one update.
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

    Example:
        >>> tfpipe.configure_cpu_devices(4)
        >>> model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        >>> history = tfpipe.fit(model, dataset, epochs=3, stages=4, micro_batches=8)
    """
    if plan is not None:
        given = {"stages": stages, "balance": balance, "micro_batches": micro_batches,
                 "schedule": schedule, "chunks": chunks, "split_points": split_points,
                 "recompute": recompute}
        chosen = from_plan(plan, given)
        stages, balance, schedule = chosen["stages"], chosen["balance"], chosen["schedule"]
        micro_batches, chunks, recompute = (
            chosen["micro_batches"], chosen["chunks"], chosen["recompute"]
        )
        devices = devices if devices is not None else list(plan.devices)
    build_from_data(model, x)
    pipe = pipeline_for(
        model,
        lambda: first_inputs(x, batch_size) if balance in ("time", "memory") else None,
        stages=stages,
        balance=balance,
        devices=devices,
        micro_batches=micro_batches,
        schedule=schedule,
        chunks=chunks,
        split_points=split_points,
        recompute=recompute,
        check_numerics=check_numerics,
        replicas=replicas,
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


_DEFAULTS: dict[str, Any] = {
    "stages": None, "balance": None, "micro_batches": 1, "schedule": "gpipe", "chunks": None,
    "split_points": None, "recompute": "never",
}


def from_plan(plan: Any, given: dict[str, Any]) -> dict[str, Any]:
    """The pipeline options of a planned configuration, checked against those given with it.

    Args:
        plan: a `tfpipe.planner.PlanConfig`.
        given: the pipeline arguments the caller passed (defaults where not given).

    Returns:
        `given` with the plan's options filled in.

    Raises:
        PipelineError: when `plan` is not a configuration, or a given argument differs from
            the plan's value for it.
    """
    if not callable(getattr(plan, "kwargs", None)) or not hasattr(plan, "devices"):
        raise PipelineError(
            f"plan={plan!r} is not a planned configuration: pass one of tfpipe.plan(...).configs, "
            "for example plan.best."
        )
    wanted = {**_DEFAULTS, **plan.kwargs()}
    out = dict(given)
    for key, value in given.items():
        listed = isinstance(value, (list, tuple))
        same = (list(value) if listed else value) == wanted[key]
        if value != _DEFAULTS[key] and not same:
            raise PipelineError(
                f"{key}={value!r} disagrees with the plan's {key}={wanted[key]!r}: drop {key} "
                "(the plan sets it) or drop plan= and give every option yourself."
            )
        out[key] = wanted[key]
    return out


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
    return pipeline_for(
        model,
        lambda: None,
        stages=stages,
        balance=balance,
        devices=devices,
        micro_batches=micro_batches,
    )


def pipeline_for(model: keras.Model, sample: Callable[[], Any], **options: Any) -> Pipeline:
    """The `Pipeline` of `model` for these options, reused from the last call when they match.

    Reusing it keeps its traced step: a second `tfpipe.fit` neither traces again nor builds
    new stage sub-models (each trace would otherwise stay in TensorFlow's gradient registry
    for the life of the process). Recompiling the model (a new optimizer, loss or metrics)
    makes a new pipeline. The cache lives on the model, so it goes when the model goes.
    """
    key = (
        id(model.optimizer) if getattr(model, "optimizer", None) is not None else None,
        id(getattr(model, "_compile_loss", None)),
        id(getattr(model, "_compile_metrics", None)),
        repr(sorted((k, _hashable(v)) for k, v in options.items())),
    )
    cached = model.__dict__.get("_tfpipe_pipeline")
    if cached is not None and cached[0] == key:
        reused: Pipeline = cached[1]
        return reused
    pipe = Pipeline(model, sample=sample(), **options)
    model.__dict__["_tfpipe_pipeline"] = (key, pipe)
    return pipe


def _hashable(value: Any) -> Any:
    if isinstance(value, Schedule):
        return ("schedule", id(value))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def build_from_data(model: keras.Model, x: Any) -> None:
    """Builds an unbuilt Sequential model from the input shape of `x` (array or dataset)."""
    if model.built or not isinstance(model, keras.Sequential) or x is None:
        return
    if isinstance(x, tf.data.Dataset):
        spec = x.element_spec
        spec = spec[0] if isinstance(spec, tuple) else spec
        shape = tuple(spec.shape)
    else:
        shape = (None,) + tuple(np.shape(x)[1:])
    model.build(shape)


def first_inputs(x: Any, batch_size: int | None) -> Any:
    """The inputs of the first batch of `x` (a dataset, or arrays cut to `batch_size`)."""
    if isinstance(x, tf.data.Dataset):
        element = next(iter(x))
        return element[0] if isinstance(element, tuple) else element
    size = batch_size or 32
    return keras.tree.map_structure(lambda a: a[:size], x)
