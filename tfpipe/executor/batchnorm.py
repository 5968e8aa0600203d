"""Deferred BatchNormalization: moving statistics updated once per batch, from all micro-batches.

Design (torchgpipe's `DeferredBatchNorm`, which no Keras tool has): with `batch_norm="deferred"`
each BatchNormalization still normalises every micro-batch by that micro-batch's own mean and
variance (the forward is Keras's own), but its moving mean and variance are left alone during
the micro-batches (`_keras.lend_moments`) and updated once, after the last one, from the
moments of the whole batch: mean = sum_m n_m mean_m / N and variance = sum_m n_m (var_m +
mean_m^2) / N - mean^2, with n_m the values per channel of micro-batch m. That is exactly what
one full-batch step computes for a layer's inputs. A stage's call collects its layers' moments
(`collect`; a stage function returns them as outputs, since a tensor made inside it cannot be
used outside), and the step files them by layer and micro-batch (`store`), so a recomputed
forward (replayed in the backward) replaces its first record instead of counting twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf

from tfpipe._keras import lend_moments, sublayers
from tfpipe.errors import PipelineError
from tfpipe.partition import Stage

_Moments = tuple[tf.Tensor, tf.Tensor, tf.Tensor]  # mean, variance, values per channel


class DeferredBatchNorm:
    """The BatchNormalization layers of a pipeline's stages, with their moments per micro-batch.

    Args:
        stages: the pipeline's stages; every BatchNormalization they call (also inside custom
            layers) is deferred.

    Raises:
        PipelineError: for a BatchNormalization with `renorm=True` (its corrections depend on
            each batch's moments as it runs).
    """

    def __init__(self, stages: list[Stage]) -> None:
        self.layers: list[tuple[Stage, keras.layers.BatchNormalization]] = []
        seen: set[int] = set()
        for stage in stages:
            for layer in [la for top in stage.layers for la in [top, *_inner(top)]]:
                if isinstance(layer, keras.layers.BatchNormalization) and id(layer) not in seen:
                    seen.add(id(layer))
                    if layer.renorm:
                        raise PipelineError(
                            f"batch_norm='deferred' cannot defer BatchNormalization "
                            f"{layer.name!r} (stage {stage.index}): it uses renorm=True, whose "
                            "corrections follow each batch's moments as it runs. Use "
                            "batch_norm='micro-batch', or renorm=False."
                        )
                    self.layers.append((stage, layer))
        self.moments: dict[tuple[int, int], list[_Moments]] = {}
        self._sink: list[tuple[int, _Moments]] | None = None

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """While a training step is traced: moments recorded, moving statistics untouched."""
        self.moments = {}
        with contextlib.ExitStack() as stack:
            for _, layer in self.layers:
                stack.enter_context(lend_moments(layer, self._recorder(layer)))
            yield

    @contextlib.contextmanager
    def collect(self) -> Iterator[list[tuple[int, _Moments]]]:
        """Gathers, in call order, `(id(layer), moments)` of the layers called while active
        (inside a stage function they are its outputs; `store` files them)."""
        outer, self._sink = self._sink, []
        try:
            yield self._sink
        finally:
            self._sink = outer

    def store(self, m: int, records: list[tuple[int, _Moments]]) -> None:
        """Files one call's records as micro-batch `m`'s; a replayed forward (recomputation)
        replaces the records of its first run instead of adding to them."""
        fresh: set[int] = set()
        for layer_id, moments in records:
            if layer_id not in fresh:
                fresh.add(layer_id)
                self.moments[(layer_id, m)] = []
            self.moments[(layer_id, m)].append(moments)

    def _recorder(self, layer: keras.layers.BatchNormalization) -> Any:
        def record(inputs: Any, mean: Any, variance: Any) -> None:
            if self._sink is not None:
                count = tf.cast(tf.size(inputs) // tf.size(mean), mean.dtype)
                self._sink.append((id(layer), (mean, variance, count)))

        return record

    def update(self) -> None:
        """Updates every layer's moving statistics from its recorded micro-batch moments, on
        the device of the stage that calls it."""
        for stage, layer in self.layers:
            parts = [p for (lid, _), ps in sorted(self.moments.items()) if lid == id(layer)
                     for p in ps]
            if not parts:
                continue  # not called in training mode (frozen, or trainable=False)
            with tf.device(stage.device):
                total = tf.add_n([n for _, _, n in parts])
                mean = tf.add_n([n * mu for mu, _, n in parts]) / total
                square = tf.add_n([n * (var + tf.square(mu)) for mu, var, n in parts]) / total
                variance = square - tf.square(mean)
                momentum = layer.momentum
                for variable, value in ((layer.moving_mean, mean),
                                        (layer.moving_variance, variance)):
                    value = tf.cast(value, variable.dtype)
                    variable.assign(variable * momentum + value * (1.0 - momentum))


def _inner(layer: Any) -> list[Any]:
    return sublayers(layer) if isinstance(layer, keras.layers.Layer) else []


def collecting(
    deferred: DeferredBatchNorm | None,
) -> contextlib.AbstractContextManager[list[tuple[int, _Moments]]]:
    """`deferred.collect()`, or an empty list to collect into when nothing is deferred."""
    return deferred.collect() if deferred is not None else contextlib.nullcontext([])
