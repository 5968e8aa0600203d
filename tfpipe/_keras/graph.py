"""Private Keras reads of the symbolic graph: layer calls, nodes, arguments, op-by-op runs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
from keras.src.models.functional import operation_fn


def layer_name_of(tensor: Any) -> str:
    """The name of the layer that made a KerasTensor.

    Keras 3.14-3.15: `KerasTensor._keras_history` (operation, node index, tensor index).
    """
    name: str = tensor._keras_history.operation.name
    return name


def node_of(tensor: Any) -> Any:
    """The Keras `Node` (one layer call) that made a KerasTensor.

    Keras 3.14-3.15: `KerasTensor._keras_history` and `Operation._inbound_nodes`.
    """
    op, node_index, _ = tensor._keras_history
    return op._inbound_nodes[node_index]


def call_index(node: Any) -> int:
    """Which call of its layer a `Node` is (0 for the first).

    Keras 3.14-3.15: `Operation._inbound_nodes`.
    """
    index: int = node.operation._inbound_nodes.index(node)
    return index


def node_layer(node: Any) -> Any:
    """The layer (or `keras.ops` operation) a `Node` calls.

    Keras 3.14-3.15: `Node.operation`.
    """
    return node.operation


def node_inputs(node: Any) -> tuple[Any, ...]:
    """The KerasTensors a `Node` consumes, in argument order (positional, then keyword).

    Keras 3.14-3.15: `Node.arguments.keras_tensors`.
    """
    return tuple(node.arguments.keras_tensors)


def node_outputs(node: Any) -> tuple[Any, ...]:
    """The KerasTensors a `Node` makes.

    Keras 3.14-3.15: `Node.outputs`.
    """
    return tuple(node.outputs)


def node_arguments(node: Any, values: Mapping[int, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A `Node`'s call arguments with each KerasTensor replaced by `values[id(tensor)]`.

    Keras 3.14-3.15: `Node.arguments.fill_in`.
    """
    args, kwargs = node.arguments.fill_in(values)
    return tuple(args), dict(kwargs)


def inner_functional(layer: Any) -> Any:
    """The Functional graph of a model used as a layer (None for any other layer).

    Keras 3.14-3.15: a built `Sequential` keeps its graph in `Sequential._functional`.
    """
    if isinstance(layer, keras.Sequential):
        return getattr(layer, "_functional", None)
    if isinstance(layer, keras.Model) and is_functional(layer):
        return layer
    return None


def sublayers(model: keras.Model) -> list[Any]:
    """Every layer inside `model`, at any depth, outer ones first.

    Keras 3.14-3.15: `Layer._flatten_layers`.
    """
    return list(model._flatten_layers(include_self=False, recursive=True))


def is_functional(model: keras.Model) -> bool:
    """Whether `model` has a Functional graph of inputs and outputs Keras can see into.

    Keras 3.14-3.15: `Functional._inputs_struct` and `Functional._outputs_struct`.
    """
    return hasattr(model, "_inputs_struct") and hasattr(model, "_outputs_struct")


def run_op_by_op(
    model: keras.Model,
    inputs: list[Any],
    training: bool,
    wrap: Callable[[Any, Callable[..., Any]], Callable[..., Any]],
) -> Any:
    """Runs a Functional model through Keras's own graph runner, one layer call at a time.

    Keras 3.14-3.15: `Functional._run_through_graph`, `Functional._standardize_inputs` and
    `keras.src.models.functional.operation_fn` (what `Functional.call` uses).

    Args:
        model: a Keras Functional model.
        inputs: its input values, as `model(inputs)` takes them.
        training: Keras's training flag.
        wrap: `wrap(op, call)` returns what runs op `op` in place of `call`, Keras's own call
            of it.

    Returns:
        The model's outputs as `_run_through_graph` returns them (a list for a list output).
    """

    def op_fn(op: Any) -> Callable[..., Any]:
        return wrap(op, operation_fn(op, training=training))

    return model._run_through_graph(model._standardize_inputs(inputs), operation_fn=op_fn)


def run_graph(
    model: keras.Model, flat_inputs: Sequence[Any], wrap: Callable[[Any], Callable[..., Any]]
) -> Any:
    """Runs a Functional model's graph on `flat_inputs` (in `model.inputs` order) as they are.

    Unlike `run_op_by_op`, the inputs are neither converted nor cast first (on KerasTensors
    that would add a `convert_to_tensor` call per input to the graph). Keras 3.14-3.15:
    `Functional._run_through_graph`.

    Args:
        model: a Keras Functional model.
        flat_inputs: one value per `model.inputs` entry.
        wrap: `wrap(op)` returns what runs op `op` (called with the node's arguments).

    Returns:
        The outputs, in the structure of the model's outputs.
    """
    return model._run_through_graph(list(flat_inputs), operation_fn=wrap)
