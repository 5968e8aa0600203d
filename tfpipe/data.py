"""The user's data as tfpipe reads it before any pipeline exists: shapes and a first batch.

Design: `tfpipe.fit` and `tfpipe.plan` both build an unbuilt Sequential model from the data,
the way `model.fit` would on its first batch, and both may need the inputs of one batch (to
profile layers); these helpers sit at the bottom of the package's layering (they import only
Keras, NumPy and TensorFlow), so the trainer and the planner share them without importing
each other. The dtype checks of array inputs are the executor's
(`tfpipe.executor.inputs.check_array_inputs`), next to the same checks on traced tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf


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
