"""Moves each stage's variables, and the optimizer slots that shadow them, onto the stage's device.

Design: users build their models before calling tfpipe, so variables usually exist on the
default device already (a model built in `tfpipe.build_scope` has none: each is then made from
its initializer on its stage's device, see `tfpipe.build`). We re-create each variable's
storage under `tf.device(stage.device)` through the Keras TF backend's own initialiser
(`Variable._initialize`), which keeps the same Python `keras.Variable` object: the user's
model, its `.keras` file and any callback still see the one variable, now on its stage's
device. Optimizer slots are colocated with their variable when built after the move; slots
built earlier (a model trained before) are moved the same way by matching the optimizer's per-
variable slot lists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf

from tfpipe._keras import (
    initialize_deferred,
    is_deferred,
    lend_update_steps,
    per_variable_candidates,
    rekey_optimizer,
    reset_storage,
    tracked_variables,
    var_key,
)
from tfpipe.devices import canonical
from tfpipe.partition import Stage


def device_of(variable: keras.Variable | tf.Variable) -> str:
    """The canonical device of a variable's storage, for example `/device:CPU:1`."""
    value = variable.value if isinstance(variable, keras.Variable) else variable
    return canonical(value.device)


def move(variable: keras.Variable, device: str) -> None:
    """Re-creates `variable`'s storage on `device`, keeping its value and its Python identity,
    and frees the old storage; a variable built in `tfpipe.build_scope` (no storage yet) is
    made on `device` from its initializer, and nowhere else."""
    if is_deferred(variable):
        with tf.device(device):
            initialize_deferred(variable)
        return
    if device_of(variable) == canonical(device):
        return
    with tf.device(device):
        reset_storage(variable, tf.identity(variable.value))


def owners(stages: Sequence[Stage]) -> dict[int, int]:
    """For each variable (by id), the first stage that uses it: the stage whose device holds it."""
    return {id(v): st.shared_from.get(id(v), st.index) for st in stages for v in st.model.weights}


def place_stages(stages: Sequence[Stage]) -> None:
    """Moves every variable (trainable or not) onto the device of the first stage that uses it.

    Also the state of its layers' seed generators (Dropout, GaussianNoise): not among a
    model's weights, but read and advanced by every call, so left on the default device it
    was a round trip per micro-batch, and a variable on another device for a compiled stage.
    """
    owner = owners(stages)
    for stage in stages:
        for v in stage.model.weights:
            if owner[id(v)] == stage.index:
                move(v, stage.device)
    seen: set[int] = set(owner)
    for stage in stages:
        for v in stage.model.variables:
            if id(v) not in seen:
                seen.add(id(v))
                move(v, stage.device)


def place_model(
    model: keras.Model, stages: Sequence[Stage], optimizer: keras.optimizers.Optimizer | None
) -> None:
    """Moves (or makes) every variable of `model` on its stage's device: the stages'
    variables, the metrics' (on the last stage) and `optimizer`'s slots beside their
    variables (`optimizer`: the model's compiled one, or None)."""
    variables = list(model.trainable_variables)
    keys = storage_keys(optimizer, variables) if optimizer is not None else None
    place_stages(stages)
    place_metrics(model, stages[-1].device)
    if optimizer is not None:
        place_optimizer(optimizer, variables, keys)


def place_metrics(model: keras.Model, device: str) -> None:
    """Moves the model's metric variables (its loss tracker, built at `compile`, and compiled
    metrics built by an earlier plain `fit`) to `device`, the last stage's: the stage that
    computes the loss and the metrics, so that only their updates' results stay there.
    Compiled metrics built later by the pipelined step are made there already."""
    for v in model.metrics_variables:
        move(v, device)


def storage_keys(
    optimizer: keras.optimizers.Optimizer, variables: list[keras.Variable]
) -> dict[Any, keras.Variable]:
    """The optimizer's keys for `variables`, taken before a move changes them.

    Keras's TF optimizer keys its per-variable bookkeeping by the storage's unique id, which a
    move replaces; `place_optimizer` uses these old keys to re-key that bookkeeping.
    """
    return {var_key(optimizer, v): v for v in variables if not is_deferred(v)}


def optimizer_chain(optimizer: keras.optimizers.Optimizer) -> list[keras.optimizers.Optimizer]:
    """The optimizer and the ones it wraps (a `LossScaleOptimizer`'s inner optimizer)."""
    chain = [optimizer]
    while getattr(chain[-1], "inner_optimizer", None) is not None:
        chain.append(chain[-1].inner_optimizer)
    return chain


def place_optimizer(
    optimizer: keras.optimizers.Optimizer,
    variables: list[keras.Variable],
    old_keys: dict[Any, keras.Variable] | None = None,
) -> None:
    """Builds `optimizer` for `variables` (if needed), puts each slot beside its variable, and
    re-keys what a pre-built optimizer recorded against the variables' old storage.

    Applies to a wrapped optimizer too (mixed precision's `LossScaleOptimizer`).

    Args:
        optimizer: the model's compiled optimizer.
        variables: the model's trainable variables, already on their stage devices, in the
            order `model.fit` passes them (`model.trainable_variables`).
        old_keys: `storage_keys(optimizer, variables)` taken before the variables moved.
    """
    chain = optimizer_chain(optimizer)
    for opt in chain:
        rekey_optimizer(opt, old_keys)
    if not optimizer.built:
        optimizer.build(variables)
    for opt in chain:
        tracked = tracked_variables(opt, variables)
        for slots in slot_lists(opt, tracked):
            for ref, slot in zip(tracked, slots):
                if slot is not None:
                    move(slot, device_of(ref))


def slot_lists(
    optimizer: keras.optimizers.Optimizer, tracked: list[keras.Variable]
) -> list[list[keras.Variable]]:
    """Optimizer attributes holding one variable per trainable variable, shape for shape (m, v).

    Args:
        optimizer: a built Keras optimizer (not a wrapper: pass each of `optimizer_chain`).
        tracked: the variables it updates, in its own order.

    Returns:
        One list per such attribute (Adam: m and v), aligned with `tracked`.
    """
    found = []
    for value in per_variable_candidates(optimizer):
        if len(value) != len(tracked) or not value:
            continue
        if all(
            x is None or (isinstance(x, keras.Variable) and tuple(x.shape) == tuple(ref.shape))
            for x, ref in zip(value, tracked)
        ):
            found.append(list(value))
    return found


@contextlib.contextmanager
def updates_on_variable_devices(optimizer: keras.optimizers.Optimizer) -> Iterator[None]:
    """Runs each variable's optimizer update on that variable's device while active.

    Keras's TF optimizer calls `update_step(gradient, variable, learning_rate)` once per
    variable (the documented override point for custom optimizers); inside a `tf.function`
    its math would otherwise land on the caller's device. We wrap it in
    `tf.device(variable.device)`, on the optimizer and any optimizer it wraps, for the
    duration of a pipelined call and restore it after. Keras's one-replica gradient
    "all-reduce" (an identity that gathers every gradient on one device) is skipped too.
    """
    # Keras "all-reduces" the gradients over the one replica of the default strategy: an
    # IdentityN of every gradient placed on one device, so each stage's gradients crossed to
    # that device and back every step (27 ms of a 130 ms step for two workers in
    # benchmarks/workers.py). Over one replica the sum is the gradient.
    skip_all_reduce = not tf.distribute.has_strategy()
    with lend_update_steps(optimizer_chain(optimizer), _on_variable_device, skip_all_reduce):
        yield


def _on_variable_device(update_step: Any) -> Any:
    def wrapped(gradient: Any, variable: Any, learning_rate: Any) -> Any:
        with tf.device(variable.device):
            return update_step(gradient, variable, learning_rate)

    return wrapped


@contextlib.contextmanager
def ops_follow_their_data() -> Iterator[None]:
    """While tracing: an op made without a device runs on the device of its largest input.

    Keras's optimizer does more than `update_step` outside it (weight decay, clipping by norm,
    value or global norm, the loss-scale unscaling and finiteness check, constraints, EMA),
    and, made without a device, that math ran on the caller's default device: each stage's
    weights or gradients crossed to it and back every step (22x the least traffic of a
    2-stage step with AdamW, clipnorm or global_clipnorm, measured on two workers). Pushed
    as a device function on the graph being traced, this places each such op beside the
    largest tensor it reads, so a stage's per-variable math stays on the stage's device and
    only scalars (a global norm's partial sums, the learning rate, a finiteness flag) cross.
    Ops with a device of their own, and ops whose inputs have none, are left as they are.
    Functions traced inside (`tf.cond` branches) inherit the device function, and a branch
    input is followed out to the tensor it captures.
    """
    with tf.compat.v1.get_default_graph().device(_largest_input_device):
        yield


def _largest_input_device(op: tf.Operation) -> str:
    if op.device:
        return str(op.device)
    best, size = "", -1.0
    for t in op.inputs:
        device = _tensor_device(t)
        n = t.shape.num_elements() if t.shape.rank is not None else None
        n = float("inf") if n is None else float(n)
        if device and n > size:
            best, size = device, n
    return best


def _tensor_device(t: Any, hops: int = 0) -> str:
    """The device `t` lives on: its op's, or, through reads, identities and a function's
    captured inputs, that of the value it stands for ("" when unknown)."""
    if hops > 16:
        return ""
    if t.op.device:
        return str(t.op.device)
    if t.op.type == "Placeholder":
        for outer, inner in getattr(t.graph, "captures", ()):
            if inner is t:
                if isinstance(outer, tf.Tensor) and hasattr(outer, "op"):
                    return _tensor_device(outer, hops + 1)
                return getattr(outer, "device", "") or ""
        return ""
    if t.op.type in ("ReadVariableOp", "Identity", "Cast") and t.op.inputs:
        return _tensor_device(t.op.inputs[0], hops + 1)
    return ""
