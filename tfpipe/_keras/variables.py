"""Private reaches into variables and optimizers: storage, deferred init, bookkeeping."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf
from tensorflow.python.ops import gen_resource_variable_ops


def reset_storage(variable: keras.Variable, value: tf.Tensor) -> None:
    """Re-creates a variable's storage from `value` (under the caller's `tf.device`), keeping
    the same Python `keras.Variable` object, and frees the old storage's buffer.

    The old buffer is freed by assigning the old storage an empty tensor (a resource
    variable takes any shape when the shape is not validated), not left to Python's
    collector: a step traced by an earlier plain `model.fit` leaves its `FuncGraph` alive
    (held outside Python's reach), whose captures hold the old handle, so the old buffer
    stayed allocated beside the new one (measured: 32 MiB of weights, 48 MiB in use after
    the first pipelined step on two logical devices). A stale function still reading the
    old storage now fails on its shape instead of training a stale copy.

    Keras 3.14-3.15: the TF backend's `Variable._initialize` and its `_value` (a
    `tf.Variable`); TensorFlow 2.16-2.21: `AssignVariableOp(validate_shape=False)`.
    """
    old = variable._value
    variable._initialize(value)
    if isinstance(old, tf.Variable) and old is not variable._value:
        with tf.device(old.device):
            gen_resource_variable_ops.assign_variable_op(
                old.handle, tf.zeros([0], old.dtype), validate_shape=False
            )


def is_deferred(variable: keras.Variable) -> bool:
    """Whether `variable` was made in a `keras.StatelessScope` and has no storage yet.

    Keras 3.14-3.15: such a variable keeps its initializer and has `_value` None until
    `_deferred_initialize`.
    """
    return getattr(variable, "_value", True) is None


def initialize_deferred(variable: keras.Variable) -> None:
    """Makes a deferred variable's storage from its initializer, under the caller's
    `tf.device` (Keras lifts the work out of any graph being traced).

    Keras 3.14-3.15: `Variable._deferred_initialize`.
    """
    variable._deferred_initialize()


def take_deferred(since: int) -> list[keras.Variable]:
    """Removes, and returns, the variables Keras registered for deferred initialisation
    after the first `since` of its global list (which the next `keras.StatelessScope` to
    exit would otherwise make on the default device).

    Keras 3.14-3.15: the global attribute `"uninitialized_variables"`.
    """
    from keras.src.backend.common import global_state

    pending = list(global_state.get_global_attribute("uninitialized_variables") or [])
    global_state.set_global_attribute("uninitialized_variables", pending[:since])
    return pending[since:]


@contextlib.contextmanager
def optimizers_made_at_once() -> Iterator[None]:
    """While active, a Keras optimizer constructed inside a `keras.StatelessScope` makes its
    own variables (iterations, the learning rate: made from values, which Keras cannot
    defer) at once, outside the scope. KerasHub task models compile themselves, with a
    default optimizer, in their constructor.

    Keras 3.14-3.15: `BaseOptimizer.__init__` (patched on the class while active, restored
    after) and the global attribute `"stateless_scope"`.
    """
    from keras.src.backend.common import global_state
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    original = BaseOptimizer.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        scope = global_state.get_global_attribute("stateless_scope")
        global_state.set_global_attribute("stateless_scope", None)
        try:
            original(self, *args, **kwargs)
        finally:
            global_state.set_global_attribute("stateless_scope", scope)

    BaseOptimizer.__init__ = init
    try:
        yield
    finally:
        BaseOptimizer.__init__ = original


def deferred_count() -> int:
    """How many variables Keras holds for deferred initialisation now (see `take_deferred`)."""
    from keras.src.backend.common import global_state

    return len(global_state.get_global_attribute("uninitialized_variables") or [])


def var_key(optimizer: keras.optimizers.Optimizer, variable: keras.Variable) -> Any:
    """The optimizer's key for a variable: its storage's unique id, which a move replaces.

    Keras 3.14-3.15: `BaseOptimizer._var_key` (the TF optimizer's override).
    """
    return optimizer._var_key(variable)


def tracked_variables(
    optimizer: keras.optimizers.Optimizer, default: Sequence[keras.Variable]
) -> list[keras.Variable]:
    """The variables a built optimizer updates, in its own order (`default` if it has none).

    Keras 3.14-3.15: `BaseOptimizer._trainable_variables`.
    """
    return list(getattr(optimizer, "_trainable_variables", default))


def rekey_optimizer(
    optimizer: keras.optimizers.Optimizer, old_keys: Mapping[Any, keras.Variable] | None
) -> None:
    """Re-keys what one optimizer (not a wrapper) recorded against its variables' storage.

    Keras 3.14-3.15: `BaseOptimizer._trainable_variables_indices` (built optimizers) and
    `_exclude_from_weight_decay` with its `_exclude_from_weight_decay_cache`.

    Args:
        optimizer: a Keras optimizer whose variables have moved.
        old_keys: `var_key` of each variable taken before the move, to the variable.
    """
    if optimizer.built:
        optimizer._trainable_variables_indices = {
            optimizer._var_key(v): i for i, v in enumerate(optimizer._trainable_variables)
        }
    excluded = getattr(optimizer, "_exclude_from_weight_decay", None)
    if excluded and old_keys:
        optimizer._exclude_from_weight_decay = {
            optimizer._var_key(old_keys[k]) if k in old_keys else k for k in excluded
        }
        optimizer._exclude_from_weight_decay_cache = {}


def per_variable_candidates(
    optimizer: keras.optimizers.Optimizer,
) -> list[list[Any] | tuple[Any, ...]]:
    """The optimizer's list and tuple attributes that may hold slots (Adam's m and v).

    Its own lists of tracked variables are left out.

    Keras 3.14-3.15: the optimizer's instance attributes (`vars`), less
    `_trainable_variables` and `_variables`.
    """
    return [
        value
        for name, value in vars(optimizer).items()
        if name not in ("_trainable_variables", "_variables") and isinstance(value, (list, tuple))
    ]


@contextlib.contextmanager
def lend_update_steps(
    optimizers: Sequence[keras.optimizers.Optimizer],
    wrap: Callable[[Any], Any],
    skip_all_reduce: bool,
) -> Iterator[None]:
    """Replaces each optimizer's `update_step` by `wrap(update_step)` while active.

    Keras 3.14-3.15: an instance attribute shadowing `update_step` (the documented override
    point for custom optimizers) and, with `skip_all_reduce`, the TF optimizer's
    `_all_reduce_sum_gradients`, made the identity on its list of (gradient, variable) pairs.
    """
    for opt in optimizers:
        opt.__dict__["update_step"] = wrap(opt.update_step)
        if skip_all_reduce:
            opt.__dict__["_all_reduce_sum_gradients"] = list
    try:
        yield
    finally:
        for opt in optimizers:
            opt.__dict__.pop("update_step", None)
            opt.__dict__.pop("_all_reduce_sum_gradients", None)
