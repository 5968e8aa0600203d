"""Measuring: every TensorFlow timing tfpipe does, of layer calls, dispatch and transfers.

Design: one module owns the clock, so the balancer (`tfpipe.balance`) and the planner
(`tfpipe.planner`) keep only plain data and pure logic and call in here for numbers. It sits
below both: it imports neither, nor the partitioner (a caller hands it the call graph).

Layer calls: time is measured by running each call on its real inputs (the sample batch
pushed through the model once), forward plus a backward for its float inputs and weights, in
a loop inside a small `tf.function` on the target device; a call of 1 + k passes minus a call
of 1 pass, over k (k passes take about 10 ms), median of a few such pairs after a warm-up, so
that the fixed cost of calling a function (a network round trip on a remote worker) is not
charged to each layer. A layer whose weights live on another device is timed as a copy with
its weights on the target (`local_copy`), as the pipeline will hold them.

Dispatch and transfers: `measure_dispatch` and `measure_transfer` time the other costs the
planner's search needs: starting one function on the devices a configuration uses, and one
hop of a tensor between two devices (a fixed latency plus bytes over a bandwidth). The
functions they time (`dispatch_function`, `hop_function`) are public, so a benchmark probes
the same quantities with its own sizes and clock.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from tfpipe._keras import layer_name_of
from tfpipe.devices import matches

if TYPE_CHECKING:
    from tfpipe.partition.graph import Graph

LOOP_SECONDS = 0.01
"""About how long the extra passes of one timed call of `time_call` take."""

MAX_EXTRA_PASSES = 1000
"""The most extra passes `time_call` runs per timed call (for layers of microseconds)."""

TRANSFER_BYTES = (4 * 1024, 2**20)
"""The small and the large tensor `measure_transfer` sends, in bytes."""

TRANSFER_HOPS = 32
"""Hops per timed call of `measure_transfer`."""


def flatten_sample(sample: Any, inputs: Any) -> list[Any]:
    """The arrays of `sample` in the order of the model inputs `inputs`.

    Args:
        sample: a batch of inputs: an array, a list, or a dict keyed by input layer name.
        inputs: the model's input KerasTensors (`Graph.inputs`).

    Returns:
        One array per input tensor.
    """
    flat = keras.tree.flatten(inputs)
    if isinstance(sample, dict) and not isinstance(inputs, dict):
        return [sample[layer_name_of(t)] for t in flat]
    leaves: list[Any] = keras.tree.flatten(sample)
    return leaves


def time_layer_calls(
    graph: Graph, sample: Any, device: str, repeats: int
) -> list[tuple[float, float]]:
    """Runs `sample` through every layer call of `graph` on `device`, timing each call.

    Args:
        graph: the model's call graph (`tfpipe.partition.read_graph`).
        sample: a batch of inputs, structured like the model's input.
        device: where to run and time the calls.
        repeats: timed runs per call (the median is kept).

    Returns:
        Per layer call, `(seconds, activation_bytes)`: forward + backward time on the batch
        (see `time_call`) and the bytes of its outputs for the batch.
    """
    values: dict[int, Any] = {}
    flat_in = keras.tree.flatten(graph.inputs)
    for t, v in zip(flat_in, flatten_sample(sample, graph.inputs)):
        values[id(t)] = tf.convert_to_tensor(v, dtype=t.dtype)
    timings = []
    for call in graph.calls:
        args, kwargs = call.arguments(values)
        layer = call.layer
        with tf.device(device):
            outputs = layer(*args, **kwargs)
        for t, v in zip(call.outputs, keras.tree.flatten(outputs)):
            values[id(t)] = v
        seconds = time_call(local_copy(layer, args, kwargs, device), args, kwargs, device, repeats)
        act = float(sum(v.shape.num_elements() * v.dtype.size for v in keras.tree.flatten(outputs)))
        timings.append((seconds, act))
    return timings


def local_copy(
    layer: keras.layers.Layer, args: tuple[Any, ...], kwargs: dict[str, Any], device: str
) -> keras.layers.Layer:
    """`layer`, or a copy of it with its weights on `device` if they live elsewhere.

    A model built on the client and profiled on a worker would otherwise read every weight
    across the network in every timed pass (4 MiB for a Dense(1024) kernel, several ms), a
    cost the pipeline never pays: there each stage's weights sit on its own device. The copy
    is made from the layer's config and given its weights; a layer that cannot be rebuilt
    from its config is timed as it is.

    Args:
        layer: a built layer.
        args: positional inputs of one call of it.
        kwargs: keyword inputs of that call.
        device: where it will be timed.

    Returns:
        `layer` itself when all its weights are on `device` (or it cannot be copied), else
        the copy.
    """
    if all(matches(device, v.value.device) for v in layer.weights):
        return layer
    try:
        copy = layer.__class__.from_config(layer.get_config())
        with tf.device(device):
            copy(*args, **kwargs)
        copy.set_weights(layer.get_weights())
    except Exception:  # noqa: BLE001 - any layer that cannot be copied is timed in place
        return layer
    return copy


def time_call(
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

    Args:
        layer: the layer to time.
        args: positional inputs of the call.
        kwargs: keyword inputs of the call.
        device: where to run it.
        repeats: timed pairs (the median is kept).

    Returns:
        Seconds of one pass, at least 1e-7.
    """
    once = _forward_backward(layer, args, kwargs)

    @tf.function  # type: ignore[untyped-decorator]  # TensorFlow ships no type hints
    def run(n: tf.Tensor) -> tf.Tensor:
        with tf.device(device):
            _, acc = tf.while_loop(
                lambda i, _: i < n, lambda i, acc: (i + 1, acc + once()), (0, tf.constant(0.0))
            )
        return acc

    def timed(n: int) -> float:
        return seconds_of(run, tf.constant(n))

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


def _forward_backward(
    layer: keras.layers.Layer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Callable[[], tf.Tensor]:
    """A function of one forward + backward pass of `layer` (gradients for its float inputs
    and trainable weights), returning a scalar that depends on all of it."""
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

    return once


def seconds_of(fn: Any, *args: Any) -> float:
    """Seconds of one call of the `tf.function` `fn` on `args`, waiting for its result."""
    start = time.perf_counter()
    fn(*args).numpy()
    return time.perf_counter() - start


def call_seconds(fn: Any, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of the `tf.function` `fn`, after one untimed call
    that traces it; each call waits for its result."""
    fn().numpy()
    return [seconds_of(fn) for _ in range(repeats)]


def measure_dispatch(devices: Sequence[str], repeats: int = 5) -> tuple[float, ...]:
    """Seconds a step pays whatever it computes, when it uses the first K of `devices`.

    For each K, times a `tf.function` that makes one scalar on each of the first K devices
    and returns their sum (median of `repeats` calls after a warm-up): the cost of starting
    a function on those devices and hearing back, which every pipeline step pays once.
    About 2 ms on two worker processes on loopback, a fraction of a ms for local devices.

    Args:
        devices: device names, as `tfpipe.plan` resolves them.
        repeats: timed calls per K.

    Returns:
        One time in seconds per K = 1 .. len(devices).

    Example:
        >>> measure_dispatch(["/device:CPU:0", "/device:CPU:1"])   # (seconds, seconds)
    """
    return tuple(
        statistics.median(call_seconds(dispatch_function(devices[:k]), repeats))
        for k in range(1, len(devices) + 1)
    )


def dispatch_function(devices: Sequence[str]) -> Callable[[], tf.Tensor]:
    """A `tf.function` that computes nothing but runs on each of `devices`: one scalar on
    each (`tf.timestamp`, stateful, so never folded away), returning their sum.

    Args:
        devices: device names.

    Returns:
        The function; `measure_dispatch` times it.
    """
    used = tuple(devices)

    @tf.function  # type: ignore[untyped-decorator]  # TensorFlow ships no type hints
    def touch() -> tf.Tensor:
        parts = []
        for d in used:
            with tf.device(d):
                parts.append(tf.timestamp())  # stateful: runs on d, never folded away
        return tf.add_n(parts)

    return touch  # type: ignore[no-any-return]  # tf.function is untyped


def measure_transfer(devices: Sequence[str], repeats: int = 5) -> tuple[float, float] | None:
    """Seconds per hop and bytes per second between the first two of `devices`.

    For a small (4 KiB) and a large (1 MiB) float32 tensor, times a `tf.function` that sends
    it `devices[0]` -> `devices[1]` -> `devices[0]` ... (`TRANSFER_HOPS` hops, each after the
    one before, adding a variable of the device it arrives on) minus the same adds kept on
    `devices[0]` (the fastest of `repeats` calls after a warm-up: a busy machine only ever
    adds time), and fits one hop's time as `latency + bytes / bandwidth` through the two
    sizes. On two worker processes on loopback this is about 0.2 ms + 1.4 GB/s; between
    logical CPU devices a few microseconds + 12-15 GB/s (a memory copy).

    Args:
        devices: device names, as `tfpipe.plan` resolves them.
        repeats: timed calls per function.

    Returns:
        `(latency_seconds, bandwidth_bytes_per_second)`, latency >= 0 and bandwidth > 0
        (`math.inf` when the large tensor crossed no slower than the small one); None for
        fewer than two devices.

    Example:
        >>> measure_transfer(["/job:worker/task:0/device:CPU:0",
        ...                   "/job:worker/task:1/device:CPU:0"])   # (0.0002, 1.4e9)
    """
    if len(devices) < 2:
        return None
    near, far = devices[0], devices[1]
    small, large = TRANSFER_BYTES
    t_small = _hop_seconds(near, far, small, repeats)
    t_large = _hop_seconds(near, far, large, repeats)
    per_byte = (t_large - t_small) / (large - small)
    if per_byte <= 0:
        return max(t_small, 0.0), math.inf
    return max(t_small - small * per_byte, 0.0), 1.0 / per_byte


def _hop_seconds(near: str, far: str, nbytes: int, repeats: int) -> float:
    """Seconds of one hop of an `nbytes` tensor between `near` and `far`: `TRANSFER_HOPS`
    hops there and back minus the same adds kept on `near`, over the hops."""
    seconds = [
        min(call_seconds(hop_function(near, other, (nbytes // 4,), TRANSFER_HOPS), repeats))
        for other in (far, near)
    ]
    return (seconds[0] - seconds[1]) / TRANSFER_HOPS


def hop_function(
    near: str, far: str, shape: Sequence[int], hops: int
) -> Callable[[], tf.Tensor]:
    """A `tf.function` that sends a float32 tensor of `shape` `near` -> `far` -> `near` ...,
    `hops` hops, each after the one before; with `far == near`, the same adds without a
    transfer (the baseline to subtract).

    Each hop adds a variable of the device it arrives on, so the tensor must get there.

    Args:
        near: where the tensor starts (and the result is made).
        far: the other device.
        shape: the tensor's shape.
        hops: how many hops (even: the tensor ends on `near`).

    Returns:
        The function, returning the sum of the tensor after the last hop.

    Example:
        >>> hop_function("/device:CPU:0", "/device:CPU:1", (256, 1024), 4)()  # 2 round trips
    """
    with tf.device(near):
        start = tf.Variable(tf.ones(shape))
    zeros = {}
    for d in dict.fromkeys((near, far)):
        with tf.device(d):
            zeros[d] = tf.Variable(0.0)

    @tf.function  # type: ignore[untyped-decorator]  # TensorFlow ships no type hints
    def run() -> tf.Tensor:
        with tf.device(near):
            t = start.read_value()
        for i in range(hops):
            d = far if i % 2 == 0 else near
            with tf.device(d):
                # an add that reads a variable of d runs on d, so the tensor must
                # get there (a chain of sines measured no transfer time at all)
                t = t + zeros[d]
        with tf.device(near):
            return tf.reduce_sum(t)  # all of it: a slice could be moved up the chain

    return run  # type: ignore[no-any-return]  # tf.function is untyped
