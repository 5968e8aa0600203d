"""Differences between the supported Keras 3 releases, kept in one place.

tfpipe reaches into a few private Keras APIs (its step replaces Keras's `train_step`); where
these moved or appeared between the oldest supported release and the newest, the names here
pick the right one so the rest of the code reads as for the newest Keras.
"""

from __future__ import annotations

from typing import Any

# The base class of every Keras variable: before Keras 3.4 the public `keras.Variable` is a
# subclass that the variables layers create are not instances of, so `isinstance` needs this.
from keras.src.backend.common import KerasVariable

try:  # Keras >= 3.6 scales the loss by the replica count under tf.distribute
    from keras.src.losses.loss import unscale_loss_for_distribution
except ImportError:  # older Keras does no such scaling: the loss is already the tracked value

    def unscale_loss_for_distribution(value: Any) -> Any:
        """Return `value` unchanged (Keras before 3.6 does not scale losses per replica)."""
        return value


__all__ = ["KerasVariable", "unscale_loss_for_distribution"]
