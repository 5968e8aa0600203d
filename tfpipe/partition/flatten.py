"""Turns any Keras model into one flat symbolic graph of layer calls over its own layers.

Design:
- Nested models are read through. Every KerasHub task holds its backbone, and every transfer
  learning script its `keras.applications` base, as a Functional model used as one layer.
  Such a model is flattened by calling its inner layers again on the outer graph's
  KerasTensors (Keras's own `_run_through_graph`, recursing into nested models instead of
  calling them): the calls become nodes of the same layer objects, so the flat graph shares
  every variable with the user's model, and `model.save` still sees the user's structure.
  Calls inside a nested model are named by their path (`backbone/transformer_layer_2`).
  A model without nested models keeps its own graph (nothing is called again).
- Subclassed models are traced: `model.call` runs once on `keras.Input`s shaped and typed
  like a sample batch, which records each layer call as a node (layers the user wrote stay
  one call each; a Functional model it calls is read through as above). What cannot be
  traced is refused with the fix: Python control flow on tensor values or raw TensorFlow ops
  on symbolic tensors (the trace fails), weights made by the model itself rather than by a
  layer, and layers called on values that do not come from the inputs (traced, they would
  be constants and never train).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpipe._keras import (
    inner_functional,
    is_functional,
    node_inputs,
    node_layer,
    node_of,
    run_graph,
    sublayers,
)
from tfpipe.data import flatten_by_name
from tfpipe.errors import PipelineError


def is_graph_model(model: keras.Model) -> bool:
    """Whether `model` is Sequential or Functional (its graph is read, not traced)."""
    return isinstance(model, keras.Sequential) or is_functional(model)


def model_io(model: keras.Model) -> tuple[Any, Any]:
    """The input and output KerasTensor structures of a built Sequential or Functional model.

    Raises:
        PipelineError: for an unbuilt Sequential model, or a subclassed model.
    """
    if isinstance(model, keras.Sequential):
        try:
            inputs, outputs = model.inputs, model.outputs
        except (AttributeError, ValueError) as err:
            raise PipelineError(
                f"Sequential model {model.name!r} is not built: give it a keras.Input(shape=...) "
                "as first layer or call model.build(input_shape) before splitting it."
            ) from err
        return inputs[0] if len(inputs) == 1 else inputs, outputs[0] if len(
            outputs
        ) == 1 else outputs
    if is_functional(model):
        return model.input, model.output
    raise PipelineError(
        f"Model {model.name!r} is a subclassed keras.Model ({type(model).__name__}) without a "
        "Functional graph of inputs and outputs."
    )


def symbolic_graph(model: keras.Model, sample: Any) -> tuple[Any, Any, dict[int, str]]:
    """The flat graph of `model`: its inputs, its outputs, and the names of re-made calls.

    Args:
        model: a built Keras model.
        sample: a batch of inputs (needed for a subclassed model only).

    Returns:
        `(inputs, outputs, names)`: KerasTensor structures, and for each node made by
        flattening, `id(node)` -> its path-qualified name (other nodes keep their layer's
        name).

    Raises:
        PipelineError: for an unbuilt Sequential model, or a model that cannot be traced.
    """
    names: dict[int, str] = {}
    if not is_graph_model(model):
        inputs, outputs = _trace(model, sample, names)
        return inputs, outputs, names
    inputs, outputs = model_io(model)
    if any(inner_functional(node_layer(n)) is not None for n in walk(inputs, outputs)):
        outputs = _flat_call(inner_functional(model), inputs, "", names)
    return inputs, outputs, names


def walk(inputs: Any, outputs: Any) -> list[Any]:
    """The nodes between `inputs` and `outputs` (excluding input layers)."""
    input_ids = {id(t) for t in keras.tree.flatten(inputs)}
    nodes: dict[int, Any] = {}
    stack = list(keras.tree.flatten(outputs))
    while stack:
        tensor = stack.pop()
        if id(tensor) in input_ids:
            continue
        node = node_of(tensor)
        if id(node) not in nodes:
            nodes[id(node)] = node
            stack.extend(node_inputs(node))
    return list(nodes.values())


def _flat_call(functional: keras.Model, inputs: Any, prefix: str, names: dict[int, str]) -> Any:
    """Calls `functional`'s layers again on `inputs`, reading through nested models.

    Returns:
        The outputs (new KerasTensors); `names` gains each new node's path-qualified name.
    """

    def wrap(op: Any) -> Callable[..., Any]:
        inner = inner_functional(op)
        if inner is not None:
            return lambda *args, **kwargs: _nested(op, inner, args, kwargs, prefix, names)

        def called(*args: Any, **kwargs: Any) -> Any:
            out = op(*args, **kwargs)
            for t in keras.tree.flatten(out)[:1]:
                names[id(node_of(t))] = prefix + op.name
            return out

        return called

    return run_graph(functional, _match_inputs(functional, inputs, prefix, names), wrap)


def _match_inputs(
    functional: keras.Model, given: Any, prefix: str, names: dict[int, str]
) -> list[Any]:
    """`given` KerasTensors as `functional.inputs` takes them: by name from a dict, else in
    flattened order; cast (a `cast` call in the graph) where the dtypes differ."""
    wanted = list(functional.inputs)
    by_name = not isinstance(functional.input, dict)
    flat, _ = flatten_by_name(given, [t.name for t in wanted], by_name)
    if len(flat) != len(wanted):
        raise PipelineError(
            f"Nested model {functional.name!r} takes {len(wanted)} inputs "
            f"{[t.name for t in wanted]} but is called with {len(flat)}; tfpipe cannot read "
            "through it. Call it with its inputs' structure, or pass stages=1."
        )
    matched = []
    for t, w in zip(flat, wanted):
        if t.dtype != w.dtype:
            t = keras.ops.cast(t, w.dtype)
            names[id(node_of(t))] = f"{prefix}{functional.name}/cast"
        matched.append(t)
    return matched


def _nested(
    model: keras.Model, inner: keras.Model, args: tuple[Any, ...], kwargs: dict[str, Any],
    prefix: str, names: dict[int, str],
) -> Any:
    # Keras records `mask=` (None per input when no layer makes a mask) and `training=`
    none = all(v is None for v in keras.tree.flatten(kwargs.get("mask")))
    extra = sorted(k for k in kwargs if k != "training" and (k != "mask" or not none))
    if len(args) != 1 or extra:
        raise PipelineError(
            f"Nested model {prefix + model.name!r} is called with arguments tfpipe cannot read "
            f"through ({len(args)} positional, keywords {extra}): call it with one "
            "structure of inputs, or pass stages=1."
        )
    return _flat_call(inner, args[0], f"{prefix}{model.name}/", names)


def _trace(model: keras.Model, sample: Any, names: dict[int, str]) -> tuple[Any, Any]:
    """Traces a subclassed model's `call` into a flat graph over its own layers."""
    inputs = _symbolic_inputs(model, sample)
    try:
        outputs = model.call(inputs)
    except PipelineError:
        raise
    except Exception as err:  # whatever Keras or TensorFlow raise on a symbolic tensor
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(
            f"tfpipe cannot split subclassed model {model.name!r} ({type(model).__name__}): "
            f"tracing its call() on symbolic inputs failed with {type(err).__name__}: {first} "
            "Splitting needs a call() built from Keras layers and keras.ops, without Python "
            "control flow on tensor values or raw TensorFlow ops; rewrite that part with "
            "keras.ops (keras.ops.cond / keras.ops.where for branches), or pass stages=1 to "
            "train the model whole on one device."
        ) from err
    graph = keras.Model(inputs, outputs)  # a scratch graph, read through like a nested model
    flat = _flat_call(graph, inputs, "", names) if _has_nested(graph) else outputs
    _check_all_weights_traced(model, walk(inputs, flat))
    return inputs, flat


def _has_nested(model: keras.Model) -> bool:
    return any(inner_functional(layer) is not None for layer in model.layers)


def _symbolic_inputs(model: keras.Model, sample: Any) -> Any:
    """`keras.Input`s shaped (batch dim free) and typed like `sample`."""
    if sample is None:
        raise PipelineError(
            f"tfpipe splits subclassed model {model.name!r} ({type(model).__name__}) by "
            "tracing its call() on inputs shaped and typed like the data: pass sample=<a "
            "batch of inputs> to Pipeline (tfpipe.fit passes its data), or pass stages=1."
        )

    def spec(name: str | None, value: Any) -> Any:
        value = value if tf.is_tensor(value) else np.asarray(value)
        dtype = keras.backend.standardize_dtype(value.dtype)
        return keras.Input(shape=tuple(value.shape[1:]), dtype=dtype, name=name)

    if isinstance(sample, dict):
        return {k: spec(k, v) for k, v in sample.items()}
    return keras.tree.map_structure(lambda v: spec(None, v), sample)


def _check_all_weights_traced(model: keras.Model, nodes: list[Any]) -> None:
    seen = {id(v) for n in nodes for v in getattr(node_layer(n), "weights", [])}
    missing = [v for v in model.weights if id(v) not in seen]
    if not missing:
        return
    paths = [v.path for v in missing][:6]
    held = {id(v): layer for layer in sublayers(model) for v in layer.weights}
    layers = sorted({held[id(v)].name for v in missing if id(v) in held})
    if layers:
        raise PipelineError(
            f"Subclassed model {model.name!r} ({type(model).__name__}) calls layer(s) "
            f"{layers} in call() on values that do not come from its inputs (for example "
            "positions made by keras.ops.arange from a static shape): traced, such a call "
            "is computed once, as a constant, so its weights "
            f"{paths} would never train. Fix: make the call inside a layer that takes the "
            "inputs (as keras_hub.layers.PositionEmbedding does: it builds the positions "
            "from its input's shape in its own call), or pass stages=1."
        )
    raise PipelineError(
        f"Subclassed model {model.name!r} ({type(model).__name__}) has weights that no "
        f"layer of its call() holds: {paths}. tfpipe places weights with the layer that "
        "uses them, so a weight made by the model itself (self.add_weight in the model) "
        "has no stage. Fix: move it into a layer (a small keras.layers.Layer that makes "
        "and uses it), or pass stages=1."
    )


def layer_order(model: keras.Model) -> list[Any]:
    """`model.layers` with nested models expanded in place (a layer may appear twice)."""
    order: list[Any] = []
    for layer in getattr(model, "layers", []):
        if inner_functional(layer) is not None:
            order.extend(layer_order(layer))
        else:
            order.append(layer)
    return order
