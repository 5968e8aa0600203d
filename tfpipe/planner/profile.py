"""The planner's measurements: per-layer time at each micro-batch size, bytes, and tensor edges.

Design: the planner needs the time of every layer call at the micro-batch sizes it
considers, not at the full batch scaled down, because small batches cost far more per sample
than large ones (per-call overheads do not shrink with the batch, and kernels run less
efficiently on few samples). So `measure_profile` runs `tfpipe.balance.profile_layers`
(timed by `tfpipe.measure`: forward + backward of each call on its real inputs, on the
target device) once per size, and `Profile.layer_seconds` interpolates between measured
sizes for any other. A call's time is then made non-decreasing in the size (a smaller batch
never takes longer than a larger one), which removes the spikes a busy machine puts into
single measurements of small batches. Everything else the cost model needs is recorded once,
as plain numbers: parameters and state bytes per call (parameters, gradients and optimizer
slots, as many slots as the built optimizer keeps), output bytes per sample, and the model's
tensors as `Edge`s (producer, consumers, bytes per sample), from which stage inputs, kept
activations and the bytes crossing each cut follow for any split. `Profile` itself is pure
data, so the search and tests can run on a profile made by hand. The other costs the search
needs, starting one function on a configuration's devices and one hop of a tensor between
two devices, are timed by `tfpipe.measure.measure_dispatch` and `measure_transfer`
(importable from here too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from tfpipe.balance import LayerCost, profile_layers
from tfpipe.balance.profile import static_bytes_per_sample
from tfpipe.devices import default_device
from tfpipe.errors import PipelineError
from tfpipe.measure import flatten_sample, measure_dispatch, measure_transfer
from tfpipe.partition.graph import Graph, read_graph
from tfpipe.planner.records import Edge, Profile

__all__ = ["Edge", "Profile", "measure_dispatch", "measure_profile", "measure_transfer"]


def measure_profile(
    model: Any,
    sample: Any,
    sizes: Sequence[int],
    device: str | None = None,
    repeats: int = 5,
) -> Profile:
    """Profiles every layer call of `model` at each micro-batch size in `sizes`.

    Args:
        model: a built Sequential or Functional Keras model (compiled, so the optimizer's
            slots are counted).
        sample: a batch of inputs, structured like the model's input, with at least
            `max(sizes)` samples; each size uses its first rows.
        sizes: micro-batch sizes to time, each >= 1.
        device: where to time the calls, for example `/device:GPU:0`; default the first
            visible GPU, else `/device:CPU:0`.
        repeats: timed runs per call and size (the median is kept).

    Returns:
        The `Profile`, with times at every distinct size (each call's time made
        non-decreasing in the size).

    Raises:
        PipelineError: for a model tfpipe cannot split (see `Pipeline`), or a sample with
            fewer rows than the largest size.

    Example:
        >>> prof = measure_profile(model, x[:64], sizes=[8, 64], device="/device:CPU:0")
        >>> prof.layer_seconds(8)   # per layer call, measured on 8 samples
    """
    graph = read_graph(model, sample)
    flat_sample = flatten_sample(sample, graph.inputs)  # in the order of the model's inputs
    rows = int(flat_sample[0].shape[0])
    wanted = sorted({int(s) for s in sizes})
    if not wanted or wanted[0] < 1 or wanted[-1] > rows:
        raise PipelineError(
            f"Cannot profile micro-batch sizes {wanted} on a sample of {rows} rows: every "
            f"size must be between 1 and {rows}."
        )
    used = device or default_device()
    costs, seconds = _time_sizes(model, sample, wanted, used, repeats)
    measured_act = [float(c.activation_bytes) / wanted[-1] for c in costs]
    edges = _edges(graph, measured_act, flat_sample, rows)
    return Profile(
        names=tuple(c.name for c in costs),
        params=tuple(float(c.params) for c in costs),
        state_bytes=tuple(float(c.state_bytes) for c in costs),
        activation_bytes=tuple(measured_act),
        edges=tuple(edges),
        seconds=tuple(seconds),
        device=used,
    )


def _time_sizes(
    model: Any, sample: Any, sizes: list[int], device: str, repeats: int
) -> tuple[list[LayerCost], list[tuple[int, tuple[float, ...]]]]:
    """Profiles the layer calls on the first `size` rows of `sample` for each of `sizes`
    (ascending), making each call's time non-decreasing in the size.

    Args:
        model: the model to profile.
        sample: a batch of inputs with at least `sizes[-1]` rows.
        sizes: distinct micro-batch sizes, ascending.
        device: where to time the calls.
        repeats: timed runs per call and size.

    Returns:
        The costs at the largest size, and `(size, per-call seconds)` pairs.
    """
    measured: list[list[float]] = []
    costs: list[LayerCost] = []
    for size in sizes:
        part = keras.tree.map_structure(lambda a, n=size: a[:n], sample)
        costs = profile_layers(model, part, device=device, repeats=repeats)
        measured.append([float(c.seconds) for c in costs])
    for i in range(len(measured) - 2, -1, -1):  # fewer samples never take longer: drop spikes
        measured[i] = [min(a, b) for a, b in zip(measured[i], measured[i + 1])]
    return costs, [(size, tuple(times)) for size, times in zip(sizes, measured)]


def _edges(
    graph: Graph, measured_act: list[float], flat_sample: list[Any], rows: int
) -> list[Edge]:
    """The graph's tensors with producer, consumers and bytes per sample.

    Sizes come from the tensor's static shape; where a dimension is unknown, from the
    measurement (the producing call's output bytes shared among its outputs, or the
    sample's own array for a model input).
    """
    consumers: dict[int, list[int]] = {}
    for j, call in enumerate(graph.calls):
        for t in call.inputs:
            consumers.setdefault(id(t), []).append(j)
    edges = []
    for t, value in zip(keras.tree.flatten(graph.inputs), flat_sample):
        measured = float(tf.size(value)) * tf.as_dtype(value.dtype).size / rows
        size = static_bytes_per_sample(t, measured)
        edges.append(Edge(-1, tuple(consumers.get(id(t), [])), size))
    for j, call in enumerate(graph.calls):
        outs = list(call.outputs)
        for t in outs:
            size = static_bytes_per_sample(t, measured_act[j] / len(outs))
            edges.append(Edge(j, tuple(consumers.get(id(t), [])), size))
    return edges
