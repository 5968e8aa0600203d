"""The one adapter over private Keras and TensorFlow: every internal read and every patch.

Design: tfpipe reaches past Keras's public API in a few places: it reads the symbolic graph
of layer calls, runs a Functional model op by op, calls the compiled loss and loss tracker,
re-creates a variable's storage on another device, re-keys the optimizer's bookkeeping, and
lends its own steps (and atomic saves, and per-device optimizer updates) to the user's model
and optimizer for one Keras call. Each such reach is one small function here, with a line
saying what it reads and which Keras versions it was written for, so a Keras or TensorFlow
upgrade is checked, and fixed, in this module alone. Callers keep their own logic; the
functions here do nothing but the read or the patch. Patches are instance attributes that
shadow the class's (`obj.__dict__[name]`), and are always removed afterwards, so the user's
model and optimizer are left as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf
from keras.src.losses.loss import unscale_loss_for_distribution
from keras.src.models.functional import operation_fn
from tensorflow.python.ops import collective_ops, gen_resource_variable_ops

_CACHE = "_tfpipe_pipeline"

# the symbolic graph ------------------------------------------------------------------------


def layer_name_of(tensor: Any) -> str:
    """The name of the layer that made a KerasTensor.

    Keras 3.14-3.15: `KerasTensor._keras_history` (operation, node index, tensor index).
    """
    name: str = tensor._keras_history.operation.name
    return name


def node_of(tensor: Any) -> Any:
    """The Keras `Node` (one layer call) that made a KerasTensor.

    Keras 3.14-3.15: `KerasTensor._keras_history` and `Operation._inbound_nodes`.
    """
    op, node_index, _ = tensor._keras_history
    return op._inbound_nodes[node_index]


def call_index(node: Any) -> int:
    """Which call of its layer a `Node` is (0 for the first).

    Keras 3.14-3.15: `Operation._inbound_nodes`.
    """
    index: int = node.operation._inbound_nodes.index(node)
    return index


def node_layer(node: Any) -> Any:
    """The layer (or `keras.ops` operation) a `Node` calls.

    Keras 3.14-3.15: `Node.operation`.
    """
    return node.operation


def node_inputs(node: Any) -> tuple[Any, ...]:
    """The KerasTensors a `Node` consumes, in argument order (positional, then keyword).

    Keras 3.14-3.15: `Node.arguments.keras_tensors`.
    """
    return tuple(node.arguments.keras_tensors)


def node_outputs(node: Any) -> tuple[Any, ...]:
    """The KerasTensors a `Node` makes.

    Keras 3.14-3.15: `Node.outputs`.
    """
    return tuple(node.outputs)


def node_arguments(node: Any, values: Mapping[int, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A `Node`'s call arguments with each KerasTensor replaced by `values[id(tensor)]`.

    Keras 3.14-3.15: `Node.arguments.fill_in`.
    """
    args, kwargs = node.arguments.fill_in(values)
    return tuple(args), dict(kwargs)


def inner_functional(layer: Any) -> Any:
    """The Functional graph of a model used as a layer (None for any other layer).

    Keras 3.14-3.15: a built `Sequential` keeps its graph in `Sequential._functional`.
    """
    if isinstance(layer, keras.Sequential):
        return getattr(layer, "_functional", None)
    if isinstance(layer, keras.Model) and is_functional(layer):
        return layer
    return None


def sublayers(model: keras.Model) -> list[Any]:
    """Every layer inside `model`, at any depth, outer ones first.

    Keras 3.14-3.15: `Layer._flatten_layers`.
    """
    return list(model._flatten_layers(include_self=False, recursive=True))


def is_functional(model: keras.Model) -> bool:
    """Whether `model` has a Functional graph of inputs and outputs Keras can see into.

    Keras 3.14-3.15: `Functional._inputs_struct` and `Functional._outputs_struct`.
    """
    return hasattr(model, "_inputs_struct") and hasattr(model, "_outputs_struct")


def run_op_by_op(
    model: keras.Model,
    inputs: list[Any],
    training: bool,
    wrap: Callable[[Any, Callable[..., Any]], Callable[..., Any]],
) -> Any:
    """Runs a Functional model through Keras's own graph runner, one layer call at a time.

    Keras 3.14-3.15: `Functional._run_through_graph`, `Functional._standardize_inputs` and
    `keras.src.models.functional.operation_fn` (what `Functional.call` uses).

    Args:
        model: a Keras Functional model.
        inputs: its input values, as `model(inputs)` takes them.
        training: Keras's training flag.
        wrap: `wrap(op, call)` returns what runs op `op` in place of `call`, Keras's own call
            of it.

    Returns:
        The model's outputs as `_run_through_graph` returns them (a list for a list output).
    """

    def op_fn(op: Any) -> Callable[..., Any]:
        return wrap(op, operation_fn(op, training=training))

    return model._run_through_graph(model._standardize_inputs(inputs), operation_fn=op_fn)


def run_graph(
    model: keras.Model, flat_inputs: Sequence[Any], wrap: Callable[[Any], Callable[..., Any]]
) -> Any:
    """Runs a Functional model's graph on `flat_inputs` (in `model.inputs` order) as they are.

    Unlike `run_op_by_op`, the inputs are neither converted nor cast first (on KerasTensors
    that would add a `convert_to_tensor` call per input to the graph). Keras 3.14-3.15:
    `Functional._run_through_graph`.

    Args:
        model: a Keras Functional model.
        flat_inputs: one value per `model.inputs` entry.
        wrap: `wrap(op)` returns what runs op `op` (called with the node's arguments).

    Returns:
        The outputs, in the structure of the model's outputs.
    """
    return model._run_through_graph(list(flat_inputs), operation_fn=wrap)


# compiled loss and metrics -------------------------------------------------------------------


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


# variables and optimizers ----------------------------------------------------------------------


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


# the user's model -----------------------------------------------------------------------------


@contextlib.contextmanager
def lend_methods(model: keras.Model, methods: Mapping[str, Callable[..., Any]]) -> Iterator[None]:
    """Gives `model` its own `methods` (its steps, its saves) while active, then removes them.

    Keras 3.14-3.15: instance attributes in `model.__dict__` shadow the class's methods
    (`train_step`, `save`, ...) and bypass Keras's attribute tracking.
    """
    for name, method in methods.items():
        model.__dict__[name] = method
    try:
        yield
    finally:
        for name in methods:
            model.__dict__.pop(name, None)


@contextlib.contextmanager
def lend_moments(
    layer: keras.layers.BatchNormalization, record: Callable[[Any, Any, Any], None]
) -> Iterator[None]:
    """While active, `layer` reports each batch's moments and leaves its moving statistics be.

    Its moments are still computed by its own `_moments` and used to normalise; `record(
    inputs, mean, variance)` sees them; `momentum` is 1.0, so Keras's own update writes the
    moving statistics back unchanged. Keras 3.14-3.15: `BatchNormalization._moments` and
    `momentum` (read when the layer is called, so while a step is traced).
    """
    own = type(layer)._moments
    momentum = layer.momentum

    def moments(inputs: Any, mask: Any) -> Any:
        mean, variance = own(layer, inputs, mask)
        record(inputs, mean, variance)
        return mean, variance

    layer.__dict__["_moments"] = moments
    layer.__dict__["momentum"] = 1.0
    try:
        yield
    finally:
        layer.__dict__.pop("_moments", None)
        layer.__dict__["momentum"] = momentum


def cached_on(model: keras.Model) -> Any:
    """What `cache_on` left on `model` (None if nothing).

    Keras 3.14-3.15: an entry of `model.__dict__`, outside Keras's attribute tracking.
    """
    return model.__dict__.get(_CACHE)


def cache_on(model: keras.Model, value: Any) -> None:
    """Keeps `value` on `model`, invisible to Keras's tracking and saving.

    Keras 3.14-3.15: an entry of `model.__dict__`, outside Keras's attribute tracking.
    """
    model.__dict__[_CACHE] = value


# TensorFlow ------------------------------------------------------------------------------------


def collective_sum(
    value: tf.Tensor,
    group_size: int,
    group_key: int,
    instance_key: int,
    ordering_token: Any,
    communication_hint: str = "auto",
) -> tf.Tensor:
    """One participant's part of an all-reduce sum (`CollectiveReduceV2`), by the
    implementation `communication_hint` names (`"auto"`: ring; `"nccl"` on GPUs).

    TensorFlow 2.16-2.21: `tensorflow.python.ops.collective_ops.all_reduce_v2` (no public
    op takes an ordering token).
    """
    reduced: tf.Tensor = collective_ops.all_reduce_v2(
        value,
        group_size=group_size,
        group_key=group_key,
        instance_key=instance_key,
        merge_op="Add",
        final_op="Id",
        communication_hint=communication_hint,
        ordering_token=ordering_token,
    )
    return reduced
