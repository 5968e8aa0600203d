"""Splits a Keras model into stages: contiguous runs of layer calls, each a Keras sub-model.

Design: each stage is `keras.Model(boundary_in, boundary_out)` built from the user's own
graph, so it shares the user's layers and variables (training a stage trains the user's model;
`model.save` needs no copy-back). A cut is allowed where exactly one tensor crosses it (chains
of layers or blocks); multi-tensor cuts (skip connections) arrive with the Functional-graph
work and are refused here with the tensors named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import keras

from tfpipe.balance import solve
from tfpipe.errors import PipelineError
from tfpipe.partition.graph import Graph, read_graph


@dataclass
class Stage:
    """One pipeline stage.

    Attributes:
        index: stage number, 0 = reads the model's inputs.
        model: a Keras sub-model sharing the user's layers and weights.
        device: the device that holds the stage's variables and runs its forward and
            backward, for example `/device:CPU:1`.
        layers: the layers called in this stage, in order.
    """

    index: int
    model: keras.Model
    device: str
    layers: list[keras.layers.Layer] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        """Number of parameters (trainable and not) held by the stage."""
        return int(sum(math.prod(v.shape) for v in self.model.weights))

    @property
    def trainable_variables(self) -> list[keras.Variable]:
        """The stage's trainable variables, in the sub-model's order."""
        return list(self.model.trainable_variables)


def allowed_cuts(graph: Graph) -> list[int]:
    """Cut positions (a stage may start at node i) where exactly one tensor crosses."""
    return [i for i in range(1, len(graph.nodes)) if len(graph.crossing(i)) == 1]


def plan_balance(
    model: keras.Model,
    graph: Graph,
    stages: int | None,
    balance: Sequence[int] | None,
) -> list[int]:
    """Decides layer counts per stage: `balance` as given (checked), or by parameter count.

    Args:
        model: the user's model (for messages).
        graph: its call graph.
        stages: K, or None when `balance` is given.
        balance: explicit layer counts, or None.

    Returns:
        Layer counts per stage.

    Raises:
        PipelineError: wrong counts, too many stages, or a cut that carries several tensors.
    """
    n = len(graph.nodes)
    names = [layer.name for layer in graph.layers]
    if balance is not None:
        balance = list(balance)
        if stages is not None and stages != len(balance):
            raise PipelineError(
                f"stages={stages} but balance={balance} has {len(balance)} entries: give one "
                "of them, or make them agree."
            )
        if any(not isinstance(b, int) or b < 1 for b in balance) or sum(balance) != n:
            raise PipelineError(
                f"balance={balance} must be positive layer counts summing to the model's "
                f"{n} layer calls ({', '.join(names)}); it sums to {sum(balance)}."
            )
        start = 0
        for s, count in enumerate(balance[:-1]):
            start += count
            crossing = graph.crossing(start)
            if len(crossing) != 1:
                raise PipelineError(
                    f"balance={balance} cuts before layer {names[start]!r} (stage {s + 1}), "
                    f"where {len(crossing)} tensors cross "
                    f"({', '.join(_tensor_name(t) for t in crossing)}); this version splits "
                    f"only where one tensor crosses. Cut at one of: "
                    f"{_describe_cuts(graph)}."
                )
        return balance
    if stages is None or not isinstance(stages, int) or stages < 1:
        raise PipelineError(f"stages must be a positive integer, got {stages!r}.")
    if stages > n:
        raise PipelineError(
            f"stages={stages} is more than the {n} layer calls of model {model.name!r} "
            f"({', '.join(names)}); use stages <= {n}."
        )
    costs = [layer.count_params() if layer.built else 0 for layer in graph.layers]
    try:
        return solve(costs, stages, allowed_cuts(graph))
    except ValueError:
        raise PipelineError(
            f"stages={stages}: model {model.name!r} has only {len(allowed_cuts(graph))} places "
            f"where a single tensor crosses ({_describe_cuts(graph)}), so it splits into at "
            f"most {len(allowed_cuts(graph)) + 1} stages in this version; use fewer stages."
        ) from None


def split(
    model: keras.Model,
    stages: int | None = None,
    balance: Sequence[int] | None = None,
    devices: Sequence[str] = (),
) -> list[Stage]:
    """Splits `model` into stages placed on `devices`.

    Args:
        model: a built Sequential or Functional model; a subclassed model only with 1 stage.
        stages: K, balanced by parameter count; or None with `balance`.
        balance: layer calls per stage.
        devices: one device name per stage.

    Returns:
        K `Stage`s whose sub-models chain: stage k's output feeds stage k+1.

    Raises:
        PipelineError: see `plan_balance` and `graph.model_io`.
    """
    if stages == 1 and balance is None and not _is_graph_model(model):
        return [Stage(0, model, devices[0], list(model.layers))]
    graph = read_graph(model)
    if not graph.nodes:
        raise PipelineError(f"Model {model.name!r} has no layers to split.")
    sizes = plan_balance(model, graph, stages, balance)
    out, start = [], 0
    for k, size in enumerate(sizes):
        end = start + size
        inputs = graph.inputs if start == 0 else graph.crossing(start)[0]
        outputs = graph.outputs if end == len(graph.nodes) else graph.crossing(end)[0]
        sub = keras.Model(inputs, outputs, name=f"{model.name}_stage{k}")
        out.append(Stage(k, sub, devices[k], graph.layers[start:end]))
        start = end
    _refuse_shared_variables(out)
    return out


def _is_graph_model(model: keras.Model) -> bool:
    return isinstance(model, keras.Sequential) or hasattr(model, "_outputs_struct")


def _refuse_shared_variables(stages: list[Stage]) -> None:
    owner: dict[int, tuple[int, str]] = {}
    for stage in stages:
        for layer in stage.layers:
            for v in layer.weights:
                prev = owner.setdefault(id(v), (stage.index, layer.name))
                if prev[0] != stage.index:
                    raise PipelineError(
                        f"Layer {layer.name!r} shares variable {v.path!r} between stage "
                        f"{prev[0]} and stage {stage.index}; shared layers across stages are "
                        "not supported in this version. Choose balance= so both uses fall in "
                        "one stage."
                    )


def _tensor_name(tensor: Any) -> str:
    op = tensor._keras_history.operation
    return f"{op.name}:{tuple(tensor.shape)}"


def _describe_cuts(graph: Graph) -> str:
    names = [layer.name for layer in graph.layers]
    cuts = allowed_cuts(graph)
    return ", ".join(f"before {names[c]!r} (balance prefix {c})" for c in cuts) or "none"
