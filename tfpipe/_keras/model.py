"""Patches lent to the user's model for one Keras call, a cache on it, a collective sum."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import keras
import tensorflow as tf
from tensorflow.python.ops import collective_ops

_CACHE = "_tfpipe_pipeline"

@contextlib.contextmanager
def lend_methods(model: keras.Model, methods: Mapping[str, Callable[..., Any]]) -> Iterator[None]:
    """Gives `model` its own `methods` (its steps, its saves) while active, then removes them.

    Keras 3.14-3.15: instance attributes in `model.__dict__` shadow the class's methods
    (`train_step`, `save`, ...) and bypass Keras's attribute tracking.
    """
    for name, method in methods.items():
        model.__dict__[name] = method
    try:
        yield
    finally:
        for name in methods:
            model.__dict__.pop(name, None)


@contextlib.contextmanager
def lend_moments(
    layer: keras.layers.BatchNormalization, record: Callable[[Any, Any, Any], None]
) -> Iterator[None]:
    """While active, `layer` reports each batch's moments and leaves its moving statistics be.

    Its moments are still computed by its own `_moments` and used to normalise; `record(
    inputs, mean, variance)` sees them; `momentum` is 1.0, so Keras's own update writes the
    moving statistics back unchanged. Keras 3.14-3.15: `BatchNormalization._moments` and
    `momentum` (read when the layer is called, so while a step is traced).
    """
    own = type(layer)._moments
    momentum = layer.momentum

    def moments(inputs: Any, mask: Any) -> Any:
        mean, variance = own(layer, inputs, mask)
        record(inputs, mean, variance)
        return mean, variance

    layer.__dict__["_moments"] = moments
    layer.__dict__["momentum"] = 1.0
    try:
        yield
    finally:
        layer.__dict__.pop("_moments", None)
        layer.__dict__["momentum"] = momentum


def cached_on(model: keras.Model) -> Any:
    """What `cache_on` left on `model` (None if nothing).

    Keras 3.14-3.15: an entry of `model.__dict__`, outside Keras's attribute tracking.
    """
    return model.__dict__.get(_CACHE)


def cache_on(model: keras.Model, value: Any) -> None:
    """Keeps `value` on `model`, invisible to Keras's tracking and saving.

    Keras 3.14-3.15: an entry of `model.__dict__`, outside Keras's attribute tracking.
    """
    model.__dict__[_CACHE] = value


def collective_sum(
    value: tf.Tensor,
    group_size: int,
    group_key: int,
    instance_key: int,
    ordering_token: Any,
    communication_hint: str = "auto",
) -> tf.Tensor:
    """One participant's part of an all-reduce sum (`CollectiveReduceV2`), by the
    implementation `communication_hint` names (`"auto"`: ring; `"nccl"` on GPUs).

    TensorFlow 2.16-2.21: `tensorflow.python.ops.collective_ops.all_reduce_v2` (no public
    op takes an ordering token).
    """
    reduced: tf.Tensor = collective_ops.all_reduce_v2(
        value,
        group_size=group_size,
        group_key=group_key,
        instance_key=instance_key,
        merge_op="Add",
        final_op="Id",
        communication_hint=communication_hint,
        ordering_token=ordering_token,
    )
    return reduced


def wrap_train_function(model: keras.Model,
                        around: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
    """Makes the model's Keras train function (when it has none) and runs each call of it
    under `around()` (it stays wrapped: `fit` keeps a train function made once).

    Keras 3.14-3.15: `make_train_function` stores `model.train_function`, the Python function
    `fit` calls once per step on the data iterator, and returns early when one is set.
    """
    if model.train_function is None:
        model.make_train_function()
    function = model.train_function
    if getattr(function, "_tfpipe_around", None) is not None:
        return

    def call(iterator: Any) -> Any:
        with around():
            return function(iterator)

    call._tfpipe_around = around  # type: ignore[attr-defined]
    model.train_function = call
