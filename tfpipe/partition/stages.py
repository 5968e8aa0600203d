"""Splits a Keras model into stages: contiguous runs of layer calls, each a Keras sub-model.

Design:
- Each stage is `keras.Model(stage_inputs, stage_outputs)` built from the user's own graph, so
  it shares the user's layers and variables (training a stage trains the user's model;
  `model.save` needs no copy-back).
- Any cut of the topological order is allowed. A stage's inputs are every tensor its layer
  calls consume that another stage (or the model's input) made; its outputs are every tensor
  it makes that a later stage consumes or that is a model output. A skip connection that
  jumps over several stages therefore travels straight from the stage that makes it to the
  stage that uses it (one device-to-device copy, torchgpipe's "portal" idea), and its
  gradient flows straight back.
- A layer called in two stages (tied weights) keeps one variable, placed on the first stage
  that uses it; both stages' backwards produce a gradient for it and the executor sums them
  before the one optimizer step.
- `split_points=[names]` starts a new stage at each named layer; `balance=[counts]` gives
  layer calls per stage; otherwise costs (parameters by default) are balanced by the
  `solver` the caller passes (`tfpipe.balance.solve`). The partitioner imports nothing of
  `tfpipe.balance`: balancing profiles layers on this package's call graph, so it sits above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras

from tfpipe._keras import layer_name_of
from tfpipe.errors import PipelineError
from tfpipe.partition.flatten import is_graph_model
from tfpipe.partition.graph import Graph, param_costs, read_graph

Solver = Callable[[Sequence[float], int], list[int]]
"""`solver(costs, k)`: k contiguous layer-call counts balancing `costs` (one per layer call)."""


@dataclass
class Stage:
    """One pipeline stage.

    Attributes:
        index: stage number, 0 = the first stage.
        model: a Keras sub-model sharing the user's layers and weights. It takes the list
            `inputs` and returns the list `outputs` (the whole model, for an opaque model
            trained as one stage: then `inputs` and `outputs` are None).
        device: the device that holds the stage's variables and runs its forward and
            backward, for example `/device:CPU:1`.
        layers: the layers called in this stage, in order.
        names: their names, prefixed by the nested models they sit in
            (`"backbone/transformer_layer_2"`).
        inputs: KerasTensors of the user's graph that this stage consumes and another stage
            (or the model input) makes.
        outputs: KerasTensors this stage makes that later stages consume or that are model
            outputs.
        shared_from: for variables this stage uses but an earlier stage holds (tied
            weights), variable id -> that stage's index.
    """

    index: int
    model: keras.Model
    device: str
    layers: list[keras.layers.Layer] = field(default_factory=list)
    inputs: list[Any] | None = None
    outputs: list[Any] | None = None
    shared_from: dict[int, int] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        """Parameters (trainable and not) this stage holds on its device: its variables less
        those an earlier stage holds (a tied table counts once, on its first stage)."""
        return int(sum(math.prod(v.shape) for v in self.model.weights
                       if id(v) not in self.shared_from))

    @property
    def trainable_variables(self) -> list[keras.Variable]:
        """The stage's trainable variables, in the sub-model's order."""
        return list(self.model.trainable_variables)


def plan_balance(
    model: keras.Model,
    graph: Graph,
    stages: int,
    balance: Sequence[int] | None,
    split_points: Sequence[str] | None = None,
    costs: Sequence[float] | None = None,
    *,
    solver: Solver,
) -> list[int]:
    """Decides layer calls per stage: from `balance`, from `split_points`, or by costs.

    The options themselves (a positive `stages` that agrees with `balance` or
    `split_points`) are checked once, by `tfpipe.options.PipelineOptions`; this checks them
    against the model.

    Args:
        model: the user's model (for messages).
        graph: its call graph.
        stages: K, the number of stages (as many as `balance` or `split_points` make).
        balance: explicit layer-call counts, or None.
        split_points: layer names where a new stage starts, or None.
        costs: per layer call, for automatic balancing; default the parameter counts.
        solver: balances `costs` over `stages` (`tfpipe.balance.solve`).

    Returns:
        Layer calls per stage.

    Raises:
        PipelineError: counts that do not add up to the model's layer calls, more stages than
            layer calls, or an unknown layer name.
    """
    n = len(graph.calls)
    names = graph.names
    if split_points is not None:
        balance = _balance_from_split_points(model, names, split_points)
    if balance is not None:
        balance = list(balance)
        if any(not isinstance(b, int) or b < 1 for b in balance) or sum(balance) != n:
            raise PipelineError(
                f"balance={balance} must be positive layer counts summing to the model's "
                f"{n} layer calls ({', '.join(names)}); it sums to {sum(balance)}."
            )
        return balance
    if stages > n:
        raise PipelineError(
            f"stages={stages} is more than the {n} layer calls of model {model.name!r} "
            f"({', '.join(names)}); use stages <= {n}."
        )
    if costs is None:
        costs = param_costs(graph)
    return solver(costs, stages)


def _balance_from_split_points(
    model: keras.Model, names: list[str], split_points: Sequence[str]
) -> list[int]:
    if isinstance(split_points, str):
        split_points = [split_points]
    starts = [_call_named(model, names, name) for name in split_points]
    if starts != sorted(set(starts)) or 0 in starts:
        raise PipelineError(
            f"split_points={list(split_points)} must name distinct layers in model order, not "
            f"the first layer {names[0]!r} (each named layer starts a new stage)."
        )
    bounds = [0] + starts + [len(names)]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _call_named(model: keras.Model, names: list[str], name: str) -> int:
    """The first call of the layer `name`: a full path, or a plain name that is unambiguous."""
    if name in names:
        return names.index(name)
    paths = sorted({n for n in names if n.rpartition("/")[2] == name})
    if len(paths) == 1:
        return names.index(paths[0])
    if paths:
        raise PipelineError(
            f"split_points names layer {name!r}, which model {model.name!r} calls in several "
            f"nested models: {', '.join(paths)}. Give the full path."
        )
    raise PipelineError(
        f"split_points names layer {name!r}, which model {model.name!r} does not call; "
        f"its layer calls are: {', '.join(names)}."
    )


def stage_io(graph: Graph, sizes: Sequence[int]) -> list[tuple[list[Any], list[Any]]]:
    """Each stage's input and output KerasTensors for a split into `sizes` layer calls.

    Returns:
        Per stage `(inputs, outputs)`: tensors consumed from elsewhere (first-use order),
        and tensors made here that another stage consumes or that are model outputs.
    """
    producer: dict[int, int] = {}
    stage_of_node: list[int] = []
    for k, size in enumerate(sizes):
        stage_of_node.extend([k] * size)
    for call, k in zip(graph.calls, stage_of_node):
        for t in call.outputs:
            producer[id(t)] = k
    model_outputs = {id(t) for t in keras.tree.flatten(graph.outputs)}
    ins: list[dict[int, Any]] = [{} for _ in sizes]
    needed_elsewhere: set[int] = set(model_outputs)
    for call, k in zip(graph.calls, stage_of_node):
        for t in call.inputs:
            if producer.get(id(t), -1) != k:
                ins[k].setdefault(id(t), t)
                needed_elsewhere.add(id(t))
    outs: list[dict[int, Any]] = [{} for _ in sizes]
    for call, k in zip(graph.calls, stage_of_node):
        for t in call.outputs:
            if id(t) in needed_elsewhere:
                outs[k].setdefault(id(t), t)
    return [(list(i.values()), list(o.values())) for i, o in zip(ins, outs)]


def split(
    model: keras.Model,
    stages: int,
    balance: Sequence[int] | None = None,
    devices: Sequence[str] = (),
    split_points: Sequence[str] | None = None,
    costs: Sequence[float] | None = None,
    *,
    solver: Solver,
    sample: Any = None,
) -> list[Stage]:
    """Splits `model` into stages placed on `devices`.

    Args:
        model: a built Sequential or Functional model; a subclassed model only with 1 stage.
        stages: K, balanced by `costs` (default parameter counts) unless `balance` or
            `split_points` (which make K stages) place the cuts.
        balance: layer calls per stage.
        devices: one device name per stage.
        split_points: layer names where a new stage starts.
        costs: per layer call, for automatic balancing.
        solver: balances `costs` over `stages` (`tfpipe.balance.solve`).
        sample: a batch of inputs, to trace a subclassed model's call (`read_graph`).

    Returns:
        K `Stage`s; stage inputs come from earlier stages or the model input.

    Raises:
        PipelineError: see `plan_balance` and `graph.model_io`.
    """
    if stages == 1 and balance is None and split_points is None and not is_graph_model(model):
        layers = list(model.layers)
        return [Stage(0, model, devices[0], layers, names=[la.name for la in layers])]
    graph = read_graph(model, sample)
    if not graph.calls:
        raise PipelineError(f"Model {model.name!r} has no layers to split.")
    sizes = plan_balance(model, graph, stages, balance, split_points, costs, solver=solver)
    out, start = [], 0
    for k, (size, (inputs, outputs)) in enumerate(zip(sizes, stage_io(graph, sizes))):
        sub = keras.Model(inputs, outputs, name=f"{model.name}_stage{k}")
        part = slice(start, start + size)
        out.append(Stage(k, sub, devices[k], graph.layers[part], inputs, outputs,
                         names=graph.names[part]))
        start += size
    holder: dict[int, int] = {}
    for stage in out:
        for v in stage.model.weights:
            first = holder.setdefault(id(v), stage.index)
            if first != stage.index:
                stage.shared_from[id(v)] = first
    return out



def check_gradient_paths(stages: Sequence[Stage]) -> None:
    """Refuses a split that leaves a stage's weights with no gradient path to the loss.

    A stage before the last trains only through the gradients its consumers send back for its
    float outputs (or through its own regularisation losses). When everything it sends on is
    integer or boolean (token ids, a quantised or `argmax` output), no gradient can come back:
    plain Keras would warn "Gradients do not exist" and leave those weights untrained, which
    in a pipeline is almost always a misplaced cut. Checked from the graph's declared dtypes
    when the pipeline is built, and again by the executor on the traced outputs (a `Lambda`
    layer declares float32 whatever it returns).

    Raises:
        PipelineError: naming the stage, its weights, the non-float tensors and the fixes.
    """
    for st in stages[:-1]:
        if st.outputs is not None:
            check_gradient_path(st, stages, [t.dtype for t in st.outputs])


def check_gradient_path(stage: Stage, stages: Sequence[Stage], dtypes: Sequence[Any]) -> None:
    """`check_gradient_paths` for one stage before the last, whose outputs have `dtypes`."""
    later = {id(v) for s in stages[stage.index + 1 :] for v in s.trainable_variables}
    own = [v for v in stage.trainable_variables if id(v) not in later]
    floating = [
        d for d in dtypes if keras.backend.is_float_dtype(keras.backend.standardize_dtype(d))
    ]
    if not own or floating or stage.model.losses or stage.outputs is None:
        return
    sent = ", ".join(
        f"{layer_name_of(t)} ({keras.backend.standardize_dtype(d)})"
        for t, d in zip(stage.outputs, dtypes)
    )
    names = [v.path for v in own][:6]
    raise PipelineError(
        f"Stage {stage.index} ({', '.join(stage.names)}) has trainable "
        f"weights {names}{' ...' if len(own) > 6 else ''} but sends the next stages only "
        f"non-float tensors: {sent}. No gradient can flow back through them, so these "
        "weights would never train (plain Keras warns 'Gradients do not exist'). Fix: cut "
        "the model elsewhere (split_points=[...] or balance=[...]), cast to float before "
        "the cut, or set those layers' trainable=False if they are meant to stay fixed."
    )
