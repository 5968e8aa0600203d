"""The planner's measured profile as plain data: `Profile` and `Edge` (no TensorFlow).

Design: the cost model and the search work on numbers only, so that they can be tested on a
profile made by hand and imported without TensorFlow; `tfpipe.planner.profile` fills a
`Profile` from measurements.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


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
