"""Private Keras reads of the compiled loss, the loss tracker and the loss's replica scaling."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras.src.losses.loss import unscale_loss_for_distribution


def compiled_loss(model: keras.Model, y: Any, y_pred: Any, sample_weight: Any) -> tf.Tensor:
    """The model's compiled loss of one batch (no regularisation terms).

    Keras 3.14-3.15: `Trainer._compile_loss`, a `CompileLoss` called as (y, y_pred, sw).
    """
    loss: tf.Tensor = model._compile_loss(y, y_pred, sample_weight)
    return loss


def compile_key(model: keras.Model) -> tuple[int, int]:
    """Identities of the model's compiled loss and metrics: they change when it is recompiled.

    Keras 3.14-3.15: `Trainer._compile_loss` and `Trainer._compile_metrics`.
    """
    return (
        id(getattr(model, "_compile_loss", None)),
        id(getattr(model, "_compile_metrics", None)),
    )


def loss_tracker(model: keras.Model) -> keras.metrics.Mean:
    """The `Mean` metric behind the `loss` that `fit` and `evaluate` report.

    Keras 3.14-3.15: `Trainer._loss_tracker`.
    """
    return model._loss_tracker


def unscale_loss(loss: tf.Tensor) -> tf.Tensor:
    """Undoes the loss's scaling by the number of replicas in sync, as Keras's steps do.

    Keras 3.14-3.15: `keras.src.losses.loss.unscale_loss_for_distribution`.
    """
    unscaled: tf.Tensor = unscale_loss_for_distribution(loss)
    return unscaled


def has_compiled_metrics(model: keras.Model) -> bool:
    """Whether the model was compiled with metrics (besides the loss).

    Keras 3.14-3.15: `Trainer._compile_metrics` (None without `metrics=`/`weighted_metrics=`).
    """
    return getattr(model, "_compile_metrics", None) is not None
