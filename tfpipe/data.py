"""The user's data as tfpipe reads it: shapes, a first batch, and batches made ahead on the host.

Design: `tfpipe.fit` and `tfpipe.plan` both build an unbuilt Sequential model from the data,
the way `model.fit` would on its first batch, and both may need the inputs of one batch (to
profile layers); these helpers sit at the bottom of the package's layering (they import only
Keras, NumPy and TensorFlow), so the trainer and the planner share them without importing
each other. The dtype checks of array inputs are the executor's
(`tfpipe.executor.inputs.check_array_inputs`), next to the same checks on traced tensors.

Host prefetch: Keras's data adapters end the `tf.data` pipelines they build in
`prefetch(AUTOTUNE)` (arrays, generators, a `PyDataset` without workers; with workers its
enqueuer makes batches ahead in its own threads or processes), and a dataset the user gives
is passed as it is, where TensorFlow's `inject_prefetch` rewrite adds the same
`prefetch(AUTOTUNE)` when its iterator is made, unless the dataset's options turn autotune or
that rewrite off. `host_prefetched` adds it to such a dataset (Keras iterates it on the host
device), so that on every path the next batch is being made while a step runs and is ready
when the next starts. It changes no element, order or count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpipe._keras import last_transformation


def build_from_data(model: keras.Model, x: Any) -> None:
    """Builds an unbuilt model from `x` (array or dataset), as `model.fit` would.

    An unbuilt Sequential model is built from the input shape; an unbuilt subclassed model
    is called once on the first two samples of the first batch (which creates its layers'
    weights, the way its first step in `model.fit` would).

    Args:
        model: any Keras model; only an unbuilt one is built.
        x: a `tf.data.Dataset` of `x` or `(x, ...)` batches, or an array (or nested
            structure whose `np.shape` is the inputs' shape) with the batch first; None
            leaves the model as it is.
    """
    if model.built or x is None:
        return
    if not isinstance(model, keras.Sequential):
        model(keras.tree.map_structure(lambda a: a[:2], first_inputs(x, 2)))
        return
    if isinstance(x, tf.data.Dataset):
        spec = x.element_spec
        spec = spec[0] if isinstance(spec, tuple) else spec
        shape = tuple(spec.shape)
    else:
        shape = (None,) + tuple(np.shape(x)[1:])
    model.build(shape)


def first_inputs(x: Any, batch_size: int | None) -> Any:
    """The inputs of the first batch of `x`.

    Args:
        x: a `tf.data.Dataset` of `x` or `(x, y, ...)` batches, or arrays (any structure).
        batch_size: samples per batch for arrays (Keras's default 32 when None).

    Returns:
        The dataset's first element's inputs (on the host, as eager tensors), or each array
        cut to its first `batch_size` rows.
    """
    if isinstance(x, tf.data.Dataset):
        element = next(iter(x))
        return element[0] if isinstance(element, tuple) else element
    size = batch_size or 32
    return keras.tree.map_structure(lambda a: a[:size], x)


def flatten_by_name(x: Any, names: Sequence[str], by_name: bool) -> tuple[list[Any], list[str]]:
    """The inputs in `x` in the order of `names`.

    Args:
        x: a structure of inputs (arrays, tensors or KerasTensors).
        names: the input names, in the order wanted.
        by_name: pick from a dict `x` by key (when the model's inputs are a list of named
            inputs rather than a dict); otherwise flatten `x` in Keras's tree order.

    Returns:
        The flat inputs, and the names a dict `x` lacks (then the inputs are only those found).
    """
    if by_name and isinstance(x, dict):
        return [x[n] for n in names if n in x], [n for n in names if n not in x]
    return keras.tree.flatten(x), []


def host_prefetched(x: Any) -> Any:
    """`x`, prefetched on the host when it is a `tf.data.Dataset` that does not end in a prefetch.

    Args:
        x: what the user passes as `x` or `validation_data` to `fit`, `evaluate` or `predict`.

    Returns:
        `x.prefetch(tf.data.AUTOTUNE)` for a dataset whose last transformation (options
        aside) is not a prefetch, the prefetch TensorFlow itself adds when autotune is on;
        anything else as it is.

    Example:
        >>> host_prefetched(tf.data.Dataset.range(8).batch(4))  # ends in a prefetch now
        <_PrefetchDataset element_spec=TensorSpec(shape=(None,), dtype=tf.int64, name=None)>
    """
    if isinstance(x, tf.data.Dataset) and last_transformation(x) != "_PrefetchDataset":
        return x.prefetch(tf.data.AUTOTUNE)
    return x
