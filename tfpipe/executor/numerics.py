"""NaN/Inf checks (`check_numerics=True`) that name the stage, the layer and the pass.

Design: a check that only says "NaN somewhere in the step" is little help in a pipeline of
many stages. Each layer call of a stage is checked as it runs: the stage's sub-model is run op
by op through Keras's own graph runner (`Functional._run_through_graph`, the function
`Functional.call` uses) with each op's float outputs passed through an identity whose forward
checks the output and whose gradient checks the gradient arriving at that output, both with
messages that name the layer and the pass. Each weight gradient is checked under the name of
the layer that owns the weight, and each gradient sent to an earlier stage under the name of
the layer that made the tensor. Dataflow guarantees that the
first layer to produce a NaN fails before any layer downstream of it runs.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from tfpipe._keras import run_op_by_op
from tfpipe.partition import Stage


def _checked_output(value: Any, forward: str, backward: str) -> Any:
    """Checks a layer output in the forward, and the gradient that reaches it in the backward."""
    if not (tf.is_tensor(value) and value.dtype.is_floating):
        return value

    @tf.custom_gradient  # type: ignore[untyped-decorator]  # TensorFlow ships no type hints
    def identity(x: tf.Tensor) -> Any:
        def grad(dy: tf.Tensor) -> tf.Tensor:
            return tf.debugging.check_numerics(dy, backward)

        return tf.debugging.check_numerics(x, forward), grad

    return identity(value)


def _check(value: Any, message: str) -> Any:
    if isinstance(value, tf.IndexedSlices):
        return tf.IndexedSlices(
            tf.debugging.check_numerics(value.values, message), value.indices, value.dense_shape
        )
    if tf.is_tensor(value) and value.dtype.is_floating:
        return tf.debugging.check_numerics(value, message)
    return value


def call_checked(stage: Stage, inputs: list[Any], training: bool, micro_batch: int) -> Any:
    """Calls a stage's sub-model layer by layer, checking every float output.

    Args:
        stage: a stage whose `model` is a Keras Functional sub-model.
        inputs: its input values, as the stage's `inputs` list.
        training: Keras's training flag.
        micro_batch: for the message.

    Returns:
        The stage's outputs, as `stage.model(inputs)` would return them.

    Raises:
        tf.errors.InvalidArgumentError (at run time): "tfpipe check_numerics: NaN or Inf in
            the forward of layer 'name' (stage s, micro-batch m)".
    """

    def checked_op(op: Any, call: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            where = f"(stage {stage.index}, micro-batch {micro_batch})"
            forward = (
                f"tfpipe check_numerics: NaN or Inf in the forward of layer {op.name!r} {where}"
            )
            backward = (
                f"tfpipe check_numerics: NaN or Inf in the backward: the gradient with "
                f"respect to the output of layer {op.name!r} {where}"
            )
            return keras.tree.map_structure(
                lambda t: _checked_output(t, forward, backward), call(*args, **kwargs)
            )

        return run

    outputs = run_op_by_op(stage.model, inputs, training, checked_op)
    return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 else outputs


def check_gradients(
    stage: Stage,
    micro_batch: int,
    kind: str,
    input_ids: list[int],
    input_grads: list[Any],
    weight_grads: list[Any],
    names: dict[int, str],
) -> tuple[list[Any], list[Any]]:
    """Checks a backward's results, naming the layer of each weight and the tensor of each input.

    Args:
        stage: the stage whose backward produced the gradients.
        micro_batch: for the message.
        kind: the action kind, `"B"`, `"I"` or `"W"`.
        input_ids: ids of the KerasTensors the input gradients belong to.
        input_grads: gradients sent to earlier stages.
        weight_grads: gradients of `stage.trainable_variables`, in order.
        names: KerasTensor id -> the name of the layer that made it.

    Returns:
        The same gradients, passed through the checks.
    """
    owner = {id(v): layer.name for layer in stage.layers for v in getattr(layer, "weights", [])}
    where = f"(stage {stage.index}, micro-batch {micro_batch}, action {kind})"
    checked_inputs = [
        _check(
            g,
            f"tfpipe check_numerics: NaN or Inf in the backward: the gradient sent back "
            f"for the output of layer {names.get(i, '?')!r} {where}",
        )
        for i, g in zip(input_ids, input_grads)
    ]
    checked_weights = [
        _check(
            g,
            f"tfpipe check_numerics: NaN or Inf in the backward: the gradient of weight "
            f"{v.path!r} of layer {owner.get(id(v), '?')!r} {where}",
        )
        for v, g in zip(stage.trainable_variables, weight_grads)
    ]
    return checked_inputs, checked_weights
