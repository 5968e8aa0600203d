"""Splits a batch into micro-batches, weighting their losses to add up to the batch loss.

Design: Keras's default reduction (`sum_over_batch_size`) divides by the number of loss
elements, so a micro-batch of b_m samples out of B contributes `(b_m / B) * loss_m`; with
`sum` it contributes `loss_m`; with `mean_with_sample_weight` it contributes
`(sum w_m / sum w) * loss_m`. Weighting per sample, not per micro-batch, makes uneven
micro-batches (B not divisible by M, a short last batch) exact. Sizes are computed in the
graph from the dynamic batch size, so one trace serves every batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from tfpipe.errors import PipelineError

SUPPORTED_REDUCTIONS = ("sum_over_batch_size", "mean", "sum", "mean_with_sample_weight")


def loss_reduction(model: keras.Model) -> str:
    """The one reduction shared by the model's compiled losses.

    Raises:
        PipelineError: for an uncompiled loss, a reduction we cannot split exactly, or losses
            with different reductions.
    """
    if model.loss is None:
        raise PipelineError(
            f"Model {model.name!r} was compiled without a loss: pass loss=... to "
            "model.compile (tfpipe trains the compiled loss)."
        )
    found = set()
    for loss in keras.tree.flatten(model.loss):
        if loss is None:
            continue
        found.add(getattr(loss, "reduction", "sum_over_batch_size") or "none")
    bad = sorted(found - set(SUPPORTED_REDUCTIONS))
    if bad or len(found) > 1:
        raise PipelineError(
            f"Model {model.name!r} compiles losses with reduction(s) {sorted(found)}; tfpipe "
            f"splits a batch exactly for one of {SUPPORTED_REDUCTIONS}. Use one reduction "
            "for all outputs (the Keras default is 'sum_over_batch_size')."
        )
    return found.pop() if found else "sum_over_batch_size"


def batch_size(x: Any) -> tf.Tensor:
    """The dynamic batch size of an input structure (first dimension of its first leaf)."""
    leaves = [t for t in keras.tree.flatten(x) if t is not None]
    return tf.shape(leaves[0])[0]


@dataclass
class MicroBatches:
    """A batch split into M micro-batches, with per-micro-batch loss weights.

    Attributes:
        xs, ys, sample_weights: lists of M structures (or Nones), micro-batch m holding
            samples `[start_m, start_m + b_m)` of the batch, on the caller's device.
        sizes: int32 tensor [M], b_m = B // M + (m < B % M).
        data_scale: M float32 scalars weighting the compiled loss of each micro-batch.
        extra_scale: M float32 scalars `b_m / B` weighting regularisation losses.
        batch: int32 scalar B.
    """

    xs: list[Any]
    ys: list[Any]
    sample_weights: list[Any]
    sizes: tf.Tensor
    data_scale: list[tf.Tensor]
    extra_scale: list[tf.Tensor]
    batch: tf.Tensor

    @classmethod
    def split(cls, x: Any, y: Any, sample_weight: Any, num: int, reduction: str) -> MicroBatches:
        """Splits `(x, y, sample_weight)` of batch size B into `num` micro-batches.

        Raises:
            PipelineError: when the batch size is known while tracing and B < num.
            tf.errors.InvalidArgumentError (at run time): when B < num, naming both; the
                pipeline re-raises it as a `PipelineError`.
        """
        shares = Shares.of(x, sample_weight, num, reduction)
        if num == 1:  # the batch is its own micro-batch: no split
            xs, ys, sws = [x], [y], [sample_weight]
        else:
            xs, ys, sws = (_split(t, shares.sizes, num, kind) for t, kind in
                           ((x, "inputs"), (y, "labels"), (sample_weight, "sample_weights")))
        data_scale = [shares.data_scale[m] for m in range(num)]
        fraction = [shares.extra_scale[m] for m in range(num)]
        return cls(xs, ys, sws, shares.sizes, data_scale, fraction, shares.batch)


@dataclass
class Shares:
    """Each micro-batch's size and loss weights, as vectors (the rank loops read them by
    index; `MicroBatches` lists them per micro-batch).

    Attributes:
        sizes: int32 [M], b_m = B // M + (m < B % M).
        data_scale: float32 [M], the weight of each micro-batch's compiled loss.
        extra_scale: float32 [M], b_m / B, the weight of its regularisation losses.
        batch: int32 scalar B.
    """

    sizes: tf.Tensor
    data_scale: tf.Tensor
    extra_scale: tf.Tensor
    batch: tf.Tensor

    @classmethod
    def of(cls, x: Any, sample_weight: Any, num: int, reduction: str) -> Shares:
        """The shares of `num` micro-batches of the batch `(x, sample_weight)`.

        Raises:
            PipelineError: when the batch size is known while tracing and B < num.
            tf.errors.InvalidArgumentError (at run time): when B < num, naming both; the
                pipeline re-raises it as a `PipelineError`.
        """
        batch = batch_size(x)
        if num == 1:  # the batch is its own micro-batch: no weighting
            return cls(tf.reshape(batch, [1]), tf.ones([1]), tf.ones([1]), batch)
        static = next(t for t in keras.tree.flatten(x) if t is not None).shape[0]
        if static is not None and static < num:
            raise PipelineError(
                f"tfpipe: a batch of {static} samples is smaller than micro_batches={num}; use "
                f"a batch size >= micro_batches (or drop_remainder=True for the last batch)."
            )
        # Fires only while the step runs (the batch size is not static, e.g. a dataset batched
        # without drop_remainder); the pipeline re-raises it as a PipelineError
        # (errors.runtime_message), the step's updates not applied.
        check = tf.debugging.Assert(
            batch >= num,
            [
                "tfpipe: a batch of",
                batch,
                f"samples is smaller than micro_batches={num}; use a batch size >= "
                "micro_batches (or drop_remainder=True for the last batch)",
            ],
        )
        with tf.control_dependencies([check]):
            base = tf.identity(batch // num)
        rem = batch % num
        sizes = base + tf.cast(tf.range(num) < rem, tf.int32)
        fraction = tf.cast(sizes, tf.float32) / tf.cast(batch, tf.float32)
        if reduction == "sum":
            data_scale = tf.ones([num])
        elif reduction == "mean_with_sample_weight" and sample_weight is not None:
            w = tf.cast(keras.tree.flatten(sample_weight)[0], tf.float32)
            per_sample = tf.reshape(w, [tf.shape(w)[0], -1])
            parts = tf.math.segment_sum(tf.reduce_sum(per_sample, 1),
                                        tf.repeat(tf.range(num), sizes))
            data_scale = tf.math.divide_no_nan(parts, tf.reduce_sum(w))
        else:
            data_scale = fraction
        return cls(sizes, data_scale, fraction, batch)


def _split(structure: Any, sizes: tf.Tensor, num: int, kind: str) -> list[Any]:
    """`structure`'s leaves split into `num` parts, in name scope `kind` (which
    `tfpipe.traffic` reads to tell inputs, labels and sample weights apart)."""
    if structure is None:
        return [None] * num
    leaves = keras.tree.flatten(structure)
    with tf.name_scope(kind):
        parts = [tf.split(t, sizes, num=num, axis=0) if t is not None else [None] * num
                 for t in leaves]
    return [keras.tree.pack_sequence_as(structure, [p[m] for p in parts]) for m in range(num)]
