"""The planner's measurements: per-layer time at each micro-batch size, bytes, and tensor edges.

Design: the planner needs the time of every layer call at the micro-batch sizes it
considers, not at the full batch scaled down, because small batches cost far more per sample
than large ones (per-call overheads do not shrink with the batch, and kernels run less
efficiently on few samples). So `measure_profile` runs `tfpipe.balance.profile_layers`
(forward + backward of each call on its real inputs, on the target device) once per size,
and `Profile.layer_seconds` interpolates between measured sizes for any other. A call's time
is then made non-decreasing in the size (a smaller batch never takes longer than a larger
one), which removes the spikes a busy machine puts into single measurements of small
batches. Everything else the cost model needs is recorded once, as plain numbers: parameters
and state bytes per call (parameters, gradients and optimizer slots, as many slots as the
built optimizer keeps), output bytes per sample, and the model's tensors as `Edge`s
(producer, consumers, bytes per sample), from which stage inputs, kept activations and the
bytes crossing each cut follow for any split. `Profile` itself is pure data (TensorFlow is
imported inside the `measure_*` functions only), so the search and tests can run on a
profile made by hand. `measure_dispatch` and `measure_transfer` time the other costs the
search needs: starting one function on the devices a configuration uses, and one hop of a
tensor between two devices (a fixed latency plus bytes over a bandwidth).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Edge:
    """One tensor of the model's call graph.

    Attributes:
        producer: index of the layer call that makes it, or -1 for a model input.
        consumers: indices of the layer calls that read it (empty for a model output only).
        bytes_per_sample: its size for one sample (batch dimension dropped).
    """

    producer: int
    consumers: tuple[int, ...]
    bytes_per_sample: float


@dataclass(frozen=True)
class Profile:
    """Measured costs of a model's layer calls, in the order of `balance=[...]`.

    Args:
        names: the layer name of each call.
        params: parameters each call owns (0 for a second call of a shared layer).
        state_bytes: per call, parameter + gradient + optimizer-slot bytes.
        activation_bytes: per call, bytes of its outputs for one sample.
        edges: the tensors between calls (and from the model inputs), see `Edge`.
        seconds: `(size, per-call seconds)` pairs, sorted by size: forward + backward time
            of each call on a batch of `size` samples.
        device: where the times were measured.

    Example:
        >>> p = Profile(("a", "b"), (10.0, 10.0), (120.0, 120.0), (64.0, 64.0),
        ...             (Edge(-1, (0,), 32.0), Edge(0, (1,), 64.0), Edge(1, (), 64.0)),
        ...             ((4, (1.0, 2.0)), (16, (2.0, 5.0))), "/device:CPU:0")
        >>> p.layer_seconds(10)
        (1.5, 3.5)
    """

    names: tuple[str, ...]
    params: tuple[float, ...]
    state_bytes: tuple[float, ...]
    activation_bytes: tuple[float, ...]
    edges: tuple[Edge, ...]
    seconds: tuple[tuple[int, tuple[float, ...]], ...]
    device: str

    def __post_init__(self) -> None:
        n = len(self.names)
        for label in ("params", "state_bytes", "activation_bytes"):
            if len(getattr(self, label)) != n:
                raise ValueError(
                    f"Profile.{label} has {len(getattr(self, label))} entries for {n} layer "
                    "calls: give one per call."
                )
        if not self.seconds:
            raise ValueError("Profile.seconds is empty: measure at least one micro-batch size.")
        sizes = [s for s, _ in self.seconds]
        if sizes != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"Profile.seconds sizes {sizes} must be distinct, >= 1 and sorted.")
        bad = [s for s, times in self.seconds if len(times) != n]
        if bad:
            raise ValueError(f"Profile.seconds at sizes {bad} do not have {n} per-call times.")

    @property
    def num_layers(self) -> int:
        """The number of layer calls n."""
        return len(self.names)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The micro-batch sizes that were measured, ascending."""
        return tuple(s for s, _ in self.seconds)

    def layer_seconds(self, size: int) -> tuple[float, ...]:
        """Forward + backward seconds of each layer call on a micro-batch of `size` samples.

        A measured size gives its measurement. Between two measured sizes the time is
        interpolated linearly; below the smallest it is the smallest's time (small batches
        are dominated by per-call overheads), above the largest it grows in proportion to the
        size (large batches are dominated by arithmetic).

        Args:
            size: samples per micro-batch, >= 1.

        Returns:
            One time in seconds per layer call.
        """
        sizes = self.sizes
        i = bisect.bisect_left(sizes, size)
        if i < len(sizes) and sizes[i] == size:
            return self.seconds[i][1]
        if i == 0:
            return self.seconds[0][1]
        if i == len(sizes):
            top, times = self.seconds[-1]
            return tuple(t * size / top for t in times)
        (s0, t0), (s1, t1) = self.seconds[i - 1], self.seconds[i]
        w = (size - s0) / (s1 - s0)
        return tuple(a + w * (b - a) for a, b in zip(t0, t1))

    def stage_input_bytes(self, start: int, stop: int) -> float:
        """Bytes per sample of the tensors layer calls `start..stop-1` read from elsewhere."""
        return sum(
            e.bytes_per_sample
            for e in self.edges
            if e.producer < start and any(start <= c < stop for c in e.consumers)
        )

    def cut_bytes(self, cut: int) -> float:
        """Bytes per sample sent across the cut before layer call `cut` (model inputs excluded:
        they come from the data, not from another stage)."""
        return sum(
            e.bytes_per_sample
            for e in self.edges
            if 0 <= e.producer < cut and any(c >= cut for c in e.consumers)
        )


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
    import keras

    from tfpipe.balance import profile_layers
    from tfpipe.balance.profile import _flatten_sample
    from tfpipe.errors import PipelineError
    from tfpipe.partition.graph import read_graph

    graph = read_graph(model)
    flat_sample = _flatten_sample(sample, graph.inputs)  # in the order of the model's inputs
    rows = int(flat_sample[0].shape[0])
    wanted = sorted({int(s) for s in sizes})
    if not wanted or wanted[0] < 1 or wanted[-1] > rows:
        raise PipelineError(
            f"Cannot profile micro-batch sizes {wanted} on a sample of {rows} rows: every "
            f"size must be between 1 and {rows}."
        )
    measured: list[list[float]] = []
    costs: list[Any] = []
    for size in wanted:
        part = keras.tree.map_structure(lambda a, n=size: a[:n], sample)
        costs = profile_layers(model, part, device=device, repeats=repeats)
        measured.append([float(c.seconds) for c in costs])
    for i in range(len(measured) - 2, -1, -1):  # fewer samples never take longer: drop spikes
        measured[i] = [min(a, b) for a, b in zip(measured[i], measured[i + 1])]
    seconds = [(size, tuple(times)) for size, times in zip(wanted, measured)]
    top = wanted[-1]
    measured_act = [float(c.activation_bytes) / top for c in costs]
    edges = _edges(graph, measured_act, flat_sample, rows)
    used = device or _default_device()
    return Profile(
        names=tuple(c.name for c in costs),
        params=tuple(float(c.params) for c in costs),
        state_bytes=tuple(float(c.state_bytes) for c in costs),
        activation_bytes=tuple(measured_act),
        edges=tuple(edges),
        seconds=tuple(seconds),
        device=used,
    )


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
    import statistics

    import tensorflow as tf

    out = []
    for k in range(1, len(devices) + 1):

        @tf.function  # type: ignore[untyped-decorator]  # TensorFlow ships no type hints
        def touch(used: tuple[str, ...] = tuple(devices[:k])) -> tf.Tensor:
            parts = []
            for d in used:
                with tf.device(d):
                    parts.append(tf.timestamp())  # stateful: runs on d, never folded away
            return tf.add_n(parts)

        out.append(statistics.median(_call_seconds(touch, repeats)))
    return tuple(out)


TRANSFER_BYTES = (4 * 1024, 2**20)  # the small and the large tensor measure_transfer sends
TRANSFER_HOPS = 32


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

    import tensorflow as tf

    if len(devices) < 2:
        return None
    near, far = devices[0], devices[1]

    zeros = {}
    for d in (near, far):
        with tf.device(d):
            zeros[d] = tf.Variable(0.0)

    def per_hop(nbytes: int) -> float:
        with tf.device(near):
            start = tf.Variable(tf.ones([nbytes // 4]))
        seconds = []
        for other in (far, near):

            @tf.function  # type: ignore[untyped-decorator]  # TensorFlow ships no type hints
            def hops(other: str = other) -> tf.Tensor:
                with tf.device(near):
                    t = start.read_value()
                for i in range(TRANSFER_HOPS):
                    d = other if i % 2 == 0 else near
                    with tf.device(d):
                        # an add that reads a variable of d runs on d, so the tensor must
                        # get there (a chain of sines measured no transfer time at all)
                        t = t + zeros[d]
                with tf.device(near):
                    return tf.reduce_sum(t)  # all of it: a slice could be moved up the chain

            seconds.append(min(_call_seconds(hops, repeats)))
        return (seconds[0] - seconds[1]) / TRANSFER_HOPS

    small, large = TRANSFER_BYTES
    t_small, t_large = per_hop(small), per_hop(large)
    per_byte = (t_large - t_small) / (large - small)
    if per_byte <= 0:
        return max(t_small, 0.0), math.inf
    return max(t_small - small * per_byte, 0.0), 1.0 / per_byte


def _call_seconds(fn: Any, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of the `tf.function` `fn`, after one untimed call
    that traces it; each call waits for its result."""
    import time

    fn().numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn().numpy()
        times.append(time.perf_counter() - start)
    return times


def _default_device() -> str:
    import tensorflow as tf

    return "/device:GPU:0" if tf.config.list_logical_devices("GPU") else "/device:CPU:0"


def _edges(graph: Any, measured_act: list[float], flat_sample: list[Any], rows: int) -> list[Edge]:
    """The graph's tensors with producer, consumers and bytes per sample.

    Sizes come from the tensor's static shape; where a dimension is unknown, from the
    measurement (the producing call's output bytes shared among its outputs, or the
    sample's own array for a model input).
    """
    import keras
    import tensorflow as tf

    consumers: dict[int, list[int]] = {}
    for j, node in enumerate(graph.nodes):
        for t in node.arguments.keras_tensors:
            consumers.setdefault(id(t), []).append(j)
    edges = []
    for t, value in zip(keras.tree.flatten(graph.inputs), flat_sample):
        measured = float(tf.size(value)) * tf.as_dtype(value.dtype).size / rows
        edges.append(Edge(-1, tuple(consumers.get(id(t), [])), _static(t, measured)))
    for j, node in enumerate(graph.nodes):
        outs = list(node.outputs)
        for t in outs:
            edges.append(
                Edge(j, tuple(consumers.get(id(t), [])), _static(t, measured_act[j] / len(outs)))
            )
    return edges


def _static(tensor: Any, fallback: float) -> float:
    """Bytes per sample from a KerasTensor's shape, or `fallback` when a dimension is unknown."""
    import tensorflow as tf

    dims = list(tensor.shape[1:])
    if any(d is None for d in dims):
        return fallback
    return float(math.prod(dims) * tf.as_dtype(tensor.dtype).size)
