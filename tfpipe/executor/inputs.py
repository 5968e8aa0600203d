"""Checks that the data's inputs have dtypes the model's inputs can take.

Design: Keras casts numeric data to an input's dtype (float64 or int arrays into a float32
input train as in plain Keras), so only a change of kind is refused: text into a numeric
input, or numbers into a string input. Plain Keras fails there with an error that names
neither the input nor the fix ("Invalid dtype: str1024"), deep in its data adapter or a layer.
The check runs on NumPy arrays before `fit` hands them to Keras, and on the traced tensors of
each step (datasets, generators), before any stage runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tfpipe._keras import layer_name_of
from tfpipe.errors import PipelineError


def dtype_kind(dtype: Any) -> str:
    """`"string"` for text dtypes (tf.string, NumPy str/bytes/object), else `"numeric"`."""
    name = getattr(dtype, "name", None) or str(dtype)  # NumPy names: "str160", "bytes40"
    return "string" if name.startswith(("string", "str", "bytes", "object")) else "numeric"


def check_input_dtypes(
    model_name: str, names: Sequence[str], expected: Sequence[Any], values: Sequence[Any]
) -> None:
    """Refuses data whose inputs are of another kind (text vs numbers) than the model's.

    Args:
        model_name: the model's name, for the message.
        names: the model's input names, in order.
        expected: the model's input dtypes (strings such as "float32"), in the same order.
        values: the data's inputs in that order: arrays, tensors or tensor specs (anything with
            a `dtype`); None entries are skipped.

    Raises:
        PipelineError: naming the input, both dtypes and the fix.
    """
    for name, want, value in zip(names, expected, values):
        got = getattr(value, "dtype", None)
        if got is None or want is None:
            continue
        if dtype_kind(got) != dtype_kind(want):
            got_name = getattr(got, "name", str(got))
            fix = (
                "cast or encode the data to numbers first, or give the model a text input "
                "(keras.Input(dtype='string')) followed by a StringLookup / TextVectorization "
                "layer"
                if dtype_kind(got) == "string"
                else "pass the text itself, or change that keras.Input's dtype"
            )
            raise PipelineError(
                f"Model {model_name!r} input {name!r} takes {want} values, but the data gives "
                f"{got_name} for it: {fix}."
            )


def check_array_inputs(model: Any, x: Any) -> None:
    """`check_input_dtypes` for NumPy inputs given to `fit` / `evaluate` / `predict`.

    Keras's data adapter refuses text arrays before any step is traced, so these are checked
    up front; datasets and generators are checked on the traced tensors of the first step.

    Args:
        model: the user's Keras model (a subclassed model without `inputs` is skipped).
        x: the `x` argument as given: an array, a list/tuple of arrays, or a dict by input name.

    Raises:
        PipelineError: as `check_input_dtypes`.
    """
    try:
        inputs = list(model.inputs or [])
    except (AttributeError, ValueError):  # subclassed, or not yet called
        return
    if not inputs or x is None:
        return
    names = [layer_name_of(t) for t in inputs]
    if isinstance(x, dict):
        values = [x.get(n) for n in names]
    else:
        values = list(x) if isinstance(x, (list, tuple)) else [x]
    if len(values) != len(names):
        return  # the step names this mismatch, with the model's input names
    arrays = [v if isinstance(v, np.ndarray) else None for v in values]
    check_input_dtypes(model.name, names, [t.dtype for t in inputs], arrays)
