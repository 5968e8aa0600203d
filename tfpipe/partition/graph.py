"""Reads a Keras model's layer graph: its layer calls in topological order.

Design: we walk Keras's own symbolic graph (`KerasTensor._keras_history` -> `Node`) instead of
`model.layers`, because a layer called twice (shared weights) is two nodes, and a stage
boundary is a property of the graph of calls, not of the list of layers. Ties in the
topological order are broken by the layer's position in `model.layers`, so `balance=[...]`
counts layers in the order the user sees in `model.summary()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import keras

from tfpipe._keras import call_index, is_functional, node_of
from tfpipe.errors import PipelineError


@dataclass(frozen=True)
class Graph:
    """A model's call graph, flattened.

    Attributes:
        inputs: the model's input structure (KerasTensors), as `model.input` gives it.
        outputs: the model's output structure (KerasTensors).
        nodes: Keras `Node`s (one per layer call) in topological order.
    """

    inputs: Any
    outputs: Any
    nodes: tuple[Any, ...]

    @property
    def layers(self) -> list[keras.layers.Layer]:
        """The layer of each node, in node order."""
        return [n.operation for n in self.nodes]


def model_io(model: keras.Model) -> tuple[Any, Any]:
    """The input and output KerasTensor structures of a built Sequential or Functional model.

    Raises:
        PipelineError: for an unbuilt model, or a subclassed model whose `call` Keras cannot
            see into.
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
        f"Model {model.name!r} is a subclassed keras.Model ({type(model).__name__}) whose call() "
        "tfpipe cannot split into stages. Build it as a Functional model (keras.Model(inputs, "
        "outputs)) or a Sequential, or pass stages=1 to train it whole on one device."
    )


def read_graph(model: keras.Model) -> Graph:
    """Flattens `model` into its layer calls in topological order.

    Args:
        model: a built Sequential or Functional Keras model.

    Returns:
        A `Graph` whose nodes exclude `InputLayer`s.

    Raises:
        PipelineError: see `model_io`.
    """
    inputs, outputs = model_io(model)
    input_ids = {id(t) for t in keras.tree.flatten(inputs)}
    nodes: dict[int, Any] = {}
    parents: dict[int, list[int]] = {}
    stack = list(keras.tree.flatten(outputs))
    while stack:
        tensor = stack.pop()
        if id(tensor) in input_ids:
            continue
        node = node_of(tensor)
        if id(node) in nodes:
            continue
        nodes[id(node)] = node
        args = node.arguments.keras_tensors
        parents[id(node)] = [id(node_of(a)) for a in args if id(a) not in input_ids]
        stack.extend(args)
    rank = {id(layer): i for i, layer in enumerate(model.layers)}
    ordered = _topological(
        nodes,
        parents,
        key=lambda n: (rank.get(id(n.operation), len(rank)), call_index(n)),
    )
    return Graph(inputs=inputs, outputs=outputs, nodes=tuple(ordered))


def _topological(nodes: dict[int, Any], parents: dict[int, list[int]], key: Any) -> list[Any]:
    """Kahn's algorithm, taking the smallest `key` among ready nodes each time."""
    waiting = {k: set(p) for k, p in parents.items()}
    children: dict[int, list[int]] = {k: [] for k in nodes}
    for k, ps in parents.items():
        for p in ps:
            children[p].append(k)
    ready = [k for k, ps in waiting.items() if not ps]
    out = []
    while ready:
        ready.sort(key=lambda k: key(nodes[k]))
        k = ready.pop(0)
        out.append(nodes[k])
        for c in children[k]:
            waiting[c].discard(k)
            if not waiting[c]:
                ready.append(c)
    return out


def param_costs(graph: Graph) -> list[float]:
    """Parameters per layer call, each variable counted once: at the first call that uses it
    (a layer called twice, or two layers sharing a table, add nothing the second time)."""
    seen: set[int] = set()
    costs = []
    for layer in graph.layers:
        fresh = [v for v in getattr(layer, "weights", []) if id(v) not in seen]
        seen.update(id(v) for v in fresh)
        costs.append(float(sum(math.prod(v.shape) for v in fresh)))
    return costs
