"""Reads a Keras model's layer graph: its layer calls, flattened, in topological order.

Design:
- We walk Keras's own symbolic graph (each KerasTensor's `Node`) instead of `model.layers`,
  because a layer called twice (shared weights) is two calls, and a stage boundary is a
  property of the graph of calls, not of the list of layers. Ties in the topological order are
  broken by the layer's position in `model.layers` (nested models expanded in place), so
  `balance=[...]` counts layer calls in the order the user sees in `model.summary()`.
- Nested models are read through and subclassed models traced (`tfpipe.partition.flatten`):
  the graph is of the layers the model finally calls, named by their path in nested models
  (`backbone/transformer_layer_2`).
- A model's graph is read once and kept (weakly, by model): re-reading would add nodes to
  the user's layers each time, and the stages, the executor and the profiler must agree on
  the same KerasTensors.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras

from tfpipe._keras import (
    call_index,
    node_arguments,
    node_inputs,
    node_layer,
    node_of,
    node_outputs,
)
from tfpipe.partition.flatten import layer_order, symbolic_graph, walk


@dataclass(frozen=True)
class Call:
    """One layer call of a model's flattened graph.

    Attributes:
        layer: the Keras layer (or `keras.ops` operation) called.
        name: the layer's name, prefixed by the nested models it sits in
            (`"llama_backbone/transformer_layer_2"`).
        inputs: the KerasTensors it consumes, in argument order.
        outputs: the KerasTensors it makes.
    """

    layer: Any
    name: str
    inputs: tuple[Any, ...]
    outputs: tuple[Any, ...]
    node: Any = field(repr=False)

    def arguments(self, values: dict[int, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's arguments with each input KerasTensor `t` replaced by `values[id(t)]`."""
        return node_arguments(self.node, values)


@dataclass(frozen=True)
class Graph:
    """A model's call graph, flattened.

    Attributes:
        inputs: the model's input structure (KerasTensors), as `model.input` gives it.
        outputs: the model's output structure (KerasTensors of the flat graph).
        calls: one `Call` per layer call, in topological order.
    """

    inputs: Any
    outputs: Any
    calls: tuple[Call, ...]

    @property
    def layers(self) -> list[Any]:
        """The layer of each call, in call order."""
        return [c.layer for c in self.calls]

    @property
    def names(self) -> list[str]:
        """The (path-qualified) name of each call, in call order."""
        return [c.name for c in self.calls]


_GRAPHS: weakref.WeakKeyDictionary[keras.Model, Graph] = weakref.WeakKeyDictionary()


def read_graph(model: keras.Model, sample: Any = None) -> Graph:
    """Flattens `model` into its layer calls in topological order (read once per model).

    Args:
        model: a built Keras model: Sequential, Functional, or subclassed.
        sample: a batch of inputs; needed (once) for a subclassed model, whose `call` is
            traced on `keras.Input`s of the sample's shapes and dtypes.

    Returns:
        A `Graph` whose calls exclude `InputLayer`s and nested models (read through).

    Raises:
        PipelineError: for an unbuilt model, or a subclassed one that cannot be traced.
    """
    graph = _GRAPHS.get(model)
    if graph is None:
        graph = _read(model, sample)
        _GRAPHS[model] = graph
    return graph


def _read(model: keras.Model, sample: Any) -> Graph:
    inputs, outputs, names = symbolic_graph(model, sample)
    nodes = walk(inputs, outputs)
    input_ids = {id(t) for t in keras.tree.flatten(inputs)}
    parents = {
        id(n): [id(node_of(t)) for t in node_inputs(n) if id(t) not in input_ids] for n in nodes
    }
    ordered = _topological({id(n): n for n in nodes}, parents, key=_order_key(model, names))
    calls = tuple(
        Call(node_layer(n), names.get(id(n), node_layer(n).name), node_inputs(n),
             node_outputs(n), n)
        for n in ordered
    )
    return Graph(inputs=inputs, outputs=outputs, calls=calls)


def _order_key(model: keras.Model, made: dict[int, str]) -> Callable[[Any], tuple[int, int]]:
    """How ties among ready calls break: a flattened graph's calls in the order they were
    made (a nested model called twice: all of its first call, then its second); any other
    graph's by the layer's position in `model.layers`, then by which call of it it is."""
    if made:
        index = {k: i for i, k in enumerate(made)}
        return lambda n: (index.get(id(n), len(index)), 0)
    order = layer_order(model)
    rank = {id(layer): i for i, layer in reversed(list(enumerate(order)))}
    return lambda n: (rank.get(id(node_layer(n)), len(rank)), call_index(n))


def _topological(nodes: dict[int, Any], parents: dict[int, list[int]], key: Any) -> list[Any]:
    """Kahn's algorithm, taking the smallest `key` among ready nodes each time."""
    waiting = {k: set(p) for k, p in parents.items()}
    children: dict[int, list[int]] = {k: [] for k in nodes}
    for k, ps in parents.items():
        for p in dict.fromkeys(ps):  # once per parent: MultiHeadAttention(x, x) reads x twice
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
