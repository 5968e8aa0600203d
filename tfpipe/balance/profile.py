"""Per-layer costs for balancing: parameters, profiled forward+backward time, and memory bytes.

Design: costs are per layer call (graph node), the unit `solve` partitions. This module keeps
the cost record and the arithmetic; the timing itself is `tfpipe.measure.time_layer_calls`
(forward + backward of each call on its real inputs, on the target device, without the fixed
cost of calling a function). Memory counts what a stage must hold: the call's output
activations for the sample batch, plus parameters, their gradients and the optimizer's slots
(as many per-variable lists as the built optimizer keeps: 2 for Adam).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from tfpipe._keras import tracked_variables
from tfpipe.balance.solve import solve
from tfpipe.devices import default_device
from tfpipe.measure import time_layer_calls
from tfpipe.partition.graph import Graph, param_costs, read_graph
from tfpipe.placement import slot_lists


@dataclass(frozen=True)
class LayerCost:
    """Profiled cost of one layer call.

    Attributes:
        name: the layer's name.
        params: parameters it owns (0 for a second call of a shared layer).
        seconds: forward + backward time on the sample batch.
        activation_bytes: bytes of its outputs for the sample batch.
        state_bytes: parameter + gradient + optimizer-slot bytes.
    """

    name: str
    params: float
    seconds: float
    activation_bytes: float
    state_bytes: float

    @property
    def memory_bytes(self) -> float:
        """Activation plus state bytes."""
        return self.activation_bytes + self.state_bytes


def static_bytes_per_sample(tensor: Any, unknown: float = 0.0) -> float:
    """Bytes of one sample of a KerasTensor, from its static shape (batch dimension dropped).

    Args:
        tensor: a KerasTensor of the model's graph.
        unknown: what to return when a dimension after the batch one is unknown.

    Returns:
        The bytes, or `unknown`.
    """
    dims = list(tensor.shape[1:])
    if any(d is None for d in dims):
        return unknown
    return float(math.prod(dims) * tf.as_dtype(tensor.dtype).size)


def activation_bytes_per_sample(graph: Graph) -> list[float]:
    """Static estimate per layer call: bytes of its outputs for one sample (batch dim dropped).

    Args:
        graph: the model's call graph (`tfpipe.partition.read_graph`).

    Returns:
        One figure per layer call; outputs with an unknown dimension count 0.
    """
    return [sum((static_bytes_per_sample(t) for t in call.outputs), 0.0) for call in graph.calls]


def profile_layers(
    model: keras.Model, sample: Any, device: str | None = None, repeats: int = 5
) -> list[LayerCost]:
    """Profiles every layer call of `model` on `sample`.

    Args:
        model: a built Sequential or Functional model (compiled, for the optimizer's slots).
        sample: a batch of inputs, structured like the model's input.
        device: where to time the calls; default the first visible GPU, else `/device:CPU:0`.
        repeats: timed runs per call (the median is kept).

    Returns:
        One `LayerCost` per layer call, in the order of `balance=[...]`.
    """
    graph = read_graph(model, sample)
    slots = _slots_per_variable(model)
    params = param_costs(graph)
    timings = time_layer_calls(graph, sample, device or default_device(), repeats)
    return [
        LayerCost(call.name, n_params, seconds, act, n_params * 4.0 * (2 + slots))
        for call, n_params, (seconds, act) in zip(graph.calls, params, timings)
    ]


def _slots_per_variable(model: keras.Model) -> int:
    """How many per-variable buffers the model's optimizer keeps (Adam: m and v)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return 0
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    tracked = tracked_variables(optimizer, model.trainable_variables)
    return len(slot_lists(optimizer, tracked))


def by_params(model: keras.Model, stages: int) -> list[int]:
    """Layer calls per stage, balancing parameter counts.

    Args:
        model: a built Sequential or Functional model.
        stages: K, the number of stages.

    Returns:
        K layer-call counts, summing to the number of layer calls.
    """
    return solve(param_costs(read_graph(model)), stages)


def by_time(model: keras.Model, sample: Any, stages: int, device: str | None = None) -> list[int]:
    """Layer calls per stage, balancing profiled forward+backward time on `sample`.

    Args:
        model: a built Sequential or Functional model.
        sample: a batch of inputs, structured like the model's input.
        stages: K, the number of stages.
        device: where to time the calls; default as in `profile_layers`.

    Returns:
        K layer-call counts, summing to the number of layer calls.

    Example:
        >>> tfpipe.balance.by_time(model, x[:64], stages=4)
        [3, 1, 2, 4]
    """
    return solve([c.seconds for c in profile_layers(model, sample, device)], stages)


def by_memory(model: keras.Model, sample: Any, stages: int) -> list[int]:
    """Layer calls per stage, balancing activation + parameter + gradient + optimizer bytes.

    Args:
        model: a built (and compiled, for the optimizer's slots) model.
        sample: a batch of inputs, structured like the model's input.
        stages: K, the number of stages.

    Returns:
        K layer-call counts, summing to the number of layer calls.
    """
    return solve([c.memory_bytes for c in profile_layers(model, sample)], stages)


def imbalance(costs: Sequence[float]) -> float:
    """Largest stage cost over the mean stage cost (1.0 is perfect balance).

    Args:
        costs: one cost per stage.

    Returns:
        `max / mean`, or 1.0 when the mean is not positive.
    """
    mean = sum(costs) / len(costs)
    return max(costs) / mean if mean > 0 else 1.0
