"""Per-layer costs for balancing: parameters, profiled forward+backward time, and memory bytes.

Design: costs are per layer call (graph node), the unit `solve` partitions. Time is measured
by running each call on its real inputs (the sample batch pushed through the model once),
forward plus a backward for its float inputs and weights, in a loop inside a small
`tf.function` on the target device; a call of 1 + k passes minus a call of 1 pass, over k
(k passes take about 10 ms), median of a few such pairs after a warm-up, so that the fixed
cost of calling a function (a network round trip on a remote worker) is not charged to each
layer. Memory counts what a stage must hold:
the call's output activations for the sample batch, plus parameters, their gradients and the
optimizer's slots (as many per-variable lists as the built optimizer keeps: 2 for Adam).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from tfpipe.balance.solve import solve

if TYPE_CHECKING:
    from tfpipe.partition.graph import Graph


LOOP_SECONDS = 0.01
"""About how long the extra passes of one timed call of `_time_call` take."""

MAX_EXTRA_PASSES = 1000
"""The most extra passes `_time_call` runs per timed call (for layers of microseconds)."""


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


def activation_bytes_per_sample(graph: Graph) -> list[float]:
    """Static estimate per layer call: bytes of its outputs for one sample (batch dim dropped)."""
    out = []
    for node in graph.nodes:
        total = 0.0
        for t in node.outputs:
            dims = [d for d in t.shape[1:]]
            if all(d is not None for d in dims):
                total += math.prod(dims) * tf.as_dtype(t.dtype).size
        out.append(total)
    return out


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
    from tfpipe.partition.graph import param_costs, read_graph  # partition imports balance

    graph = read_graph(model)
    device = device or (
        "/device:GPU:0" if tf.config.list_logical_devices("GPU") else "/device:CPU:0"
    )
    values: dict[int, Any] = {}
    flat_in = keras.tree.flatten(graph.inputs)
    flat_sample = _flatten_sample(sample, graph.inputs)
    for t, v in zip(flat_in, flat_sample):
        values[id(t)] = tf.convert_to_tensor(v, dtype=t.dtype)
    slots = _slots_per_variable(model)
    params = param_costs(graph)
    costs = []
    for node, n_params in zip(graph.nodes, params):
        args, kwargs = node.arguments.fill_in(values)
        layer = node.operation
        with tf.device(device):
            outputs = layer(*args, **kwargs)
        for t, v in zip(node.outputs, keras.tree.flatten(outputs)):
            values[id(t)] = v
        seconds = _time_call(_local_copy(layer, args, kwargs, device), args, kwargs, device,
                             repeats)
        act = float(sum(v.shape.num_elements() * v.dtype.size for v in keras.tree.flatten(outputs)))
        costs.append(LayerCost(layer.name, n_params, seconds, act, n_params * 4.0 * (2 + slots)))
    return costs


def _flatten_sample(sample: Any, inputs: Any) -> list[Any]:
    flat = keras.tree.flatten(inputs)
    if isinstance(sample, dict) and not isinstance(inputs, dict):
        return [sample[t._keras_history.operation.name] for t in flat]
    leaves: list[Any] = keras.tree.flatten(sample)
    return leaves


def _on(actual: str, wanted: str) -> bool:
    """Whether device string `actual` is the device `wanted` names (unset parts match all)."""
    a, w = tf.DeviceSpec.from_string(actual), tf.DeviceSpec.from_string(wanted)
    return all(
        getattr(w, part) in (None, getattr(a, part))
        for part in ("job", "replica", "task", "device_type", "device_index")
    )


def _local_copy(
    layer: keras.layers.Layer, args: tuple[Any, ...], kwargs: dict[str, Any], device: str
) -> keras.layers.Layer:
    """`layer`, or a copy of it with its weights on `device` if they live elsewhere.

    A model built on the client and profiled on a worker would otherwise read every weight
    across the network in every timed pass (4 MiB for a Dense(1024) kernel, several ms), a
    cost the pipeline never pays: there each stage's weights sit on its own device. The copy
    is made from the layer's config and given its weights; a layer that cannot be rebuilt
    from its config is timed as it is.
    """
    if all(_on(v.value.device, device) for v in layer.weights):
        return layer
    try:
        copy = layer.__class__.from_config(layer.get_config())
        with tf.device(device):
            copy(*args, **kwargs)
        copy.set_weights(layer.get_weights())
    except Exception:  # noqa: BLE001 - any layer that cannot be copied is timed in place
        return layer
    return copy


def _time_call(
    layer: keras.layers.Layer,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    device: str,
    repeats: int,
) -> float:
    """Seconds of one forward + backward of `layer` on `args`, without the call's overhead.

    Each timed call runs the pass `n` times in a `tf.while_loop` on `device`; the time of one
    pass is the difference between a call with `n = 1 + k` and one with `n = 1`, over k,
    median over `repeats` such pairs, with k chosen so the k passes take about
    `LOOP_SECONDS` (at least 2, at most `MAX_EXTRA_PASSES`). The difference removes what a
    call costs whatever it computes (the function dispatch, and on a remote worker a network
    round trip of several ms), which would otherwise be charged to every layer as if it were
    compute; the many passes keep a small layer's time above the jitter of those costs.
    """
    floats = [
        a for a in keras.tree.flatten((args, kwargs)) if tf.is_tensor(a) and a.dtype.is_floating
    ]

    def once() -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(floats)
            out = keras.tree.flatten(layer(*args, **kwargs))
            total = tf.add_n(
                [tf.reduce_sum(tf.cast(o, tf.float32)) for o in out if o.dtype.is_floating]
                or [tf.constant(0.0)]
            )
        sources = floats + list(layer.trainable_variables)
        grads = (
            tape.gradient(total, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            if sources
            else []
        )
        return tf.add_n([total] + [tf.reduce_sum(tf.convert_to_tensor(g)) for g in grads])

    @tf.function  # type: ignore[untyped-decorator]  # TensorFlow ships no type hints
    def run(n: tf.Tensor) -> tf.Tensor:
        with tf.device(device):
            _, acc = tf.while_loop(
                lambda i, _: i < n, lambda i, acc: (i + 1, acc + once()), (0, tf.constant(0.0))
            )
        return acc

    def timed(n: int) -> float:
        start = time.perf_counter()
        run(tf.constant(n)).numpy()
        return time.perf_counter() - start

    timed(1)  # trace and warm up
    # enough extra passes that they take LOOP_SECONDS, so the call's own jitter (tens of
    # microseconds locally, a millisecond on a worker) is small beside them
    rough = max((timed(11) - timed(1)) / 10, 1e-6)
    extra = int(min(max(LOOP_SECONDS / rough, 2), MAX_EXTRA_PASSES))
    diffs = []
    for _ in range(repeats):
        one = timed(1)
        diffs.append((timed(1 + extra) - one) / extra)
    return max(statistics.median(diffs), 1e-7)


def _slots_per_variable(model: keras.Model) -> int:
    """How many per-variable buffers the model's optimizer keeps (Adam: m and v)."""
    from tfpipe.placement import _slot_lists

    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return 0
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    tracked = list(getattr(optimizer, "_trainable_variables", model.trainable_variables))
    return len(_slot_lists(optimizer, tracked))


def by_params(model: keras.Model, stages: int) -> list[int]:
    """Layer calls per stage, balancing parameter counts."""
    from tfpipe.partition.graph import param_costs, read_graph

    return solve(param_costs(read_graph(model)), stages)


def by_time(model: keras.Model, sample: Any, stages: int, device: str | None = None) -> list[int]:
    """Layer calls per stage, balancing profiled forward+backward time on `sample`.

    Example:
        >>> tfpipe.balance.by_time(model, x[:64], stages=4)
        [3, 1, 2, 4]
    """
    return solve([c.seconds for c in profile_layers(model, sample, device)], stages)


def by_memory(model: keras.Model, sample: Any, stages: int) -> list[int]:
    """Layer calls per stage, balancing activation + parameter + gradient + optimizer bytes."""
    return solve([c.memory_bytes for c in profile_layers(model, sample)], stages)


def imbalance(costs: Sequence[float]) -> float:
    """Largest stage cost over the mean stage cost (1.0 is perfect balance)."""
    mean = sum(costs) / len(costs)
    return max(costs) / mean if mean > 0 else 1.0
