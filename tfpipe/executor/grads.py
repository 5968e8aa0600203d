"""Weight-gradient accumulation over micro-batches, sparse combination and the optimizer step.

Design:
- Accumulation sums each stage's weight gradients over micro-batches on the stage's device
  (`GradSums`); then the model's own optimizer applies one step to all variables at once
  (`apply_gradients`), so the step counter, learning-rate schedule and any global gradient
  clipping see one step, as in `model.fit`. Its math outside `update_step` (weight decay,
  clipping, unscaling, constraints, EMA) is traced under `placement.ops_follow_their_data`,
  so each variable's share runs on its stage's device (tests/test_device_traffic.py).
- IndexedSlices (embedding gradients) keep the structure a full batch would give: they are
  kept per micro-batch (`SparseParts`) and combined once all are known (`combine_sparse`),
  because Keras's optimizers square slices before summing duplicates (Adam's v).
- A variable used by several stages gets the sum of their gradients, as TensorFlow sums the
  gradients of two uses (`sum_uses`), on the device of the stage that owns it.
- With replicas, each stage's sums are summed over the copies onto copy 0's device
  (`all_reduce`, see `tfpipe.executor.replicas`) before the optimizer step.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from tfpipe.executor.replicas import ReplicaReducer
from tfpipe.partition import Stage
from tfpipe.placement import ops_follow_their_data


def vjp(
    tape: tf.GradientTape,
    targets: list[Any],
    inputs: list[Any],
    weights: list[Any],
    seeds: list[Any],
) -> tuple[list[Any], list[Any]]:
    """The vector-Jacobian product of `targets` with `seeds`, for each input and weight.

    A stage holds all of a layer's variables, but a call may use only some (a KerasHub
    `ReversibleEmbedding` called in reverse reads its output table, not its input table). A
    weight the targets do not depend on gets None, as in Keras's own step (the optimizer
    skips it when no stage gives it a gradient; zeros would turn another stage's sparse
    gradient dense and change Adam's second moment); an input tensor gets zeros, to send
    back. (TensorFlow's `UnconnectedGradients.ZERO` fails on Keras variables, whose dtype is
    a string.)

    Args:
        tape: the tape that recorded the stage's forward.
        targets: its outputs (and loss terms).
        inputs: watched input tensors.
        weights: the stage's trainable variables, or a replica's read of them (watched
            tensors, `tfpipe.executor.weights`).
        seeds: one gradient per target (shaped like it).

    Returns:
        One gradient per input (a tensor), and one per weight (a tensor, IndexedSlices for a
        gathered table, or None for an unused weight).
    """
    grads = tape.gradient(targets, [*inputs, *weights], output_gradients=seeds)
    n = len(inputs)
    return [tf.zeros_like(s) if g is None else g for s, g in zip(inputs, grads[:n])], grads[n:]


OWN_SUM = 1 << 16
"""Variables larger than this (elements) get a sum of their own: a loop variable in the
loops (`StagePair.dense_groups`), an addition in the step's graph in the unrolled step
(`GradSums.add`), where the runtime can write it into the running sum's buffer."""


class SparseParts(list[Any]):
    """The IndexedSlices gradients of one variable from several micro-batches, combined by
    `combine_sparse` once all are known."""


def accumulate(total: Any, grad: Any) -> Any:
    """Adds a micro-batch's gradient of one variable to the running total.

    Dense gradients are summed as they come. IndexedSlices (embedding gradients) are kept per
    micro-batch and combined by `combine_sparse` at the end.

    Args:
        total: the running total (None before the first micro-batch, or `SparseParts`).
        grad: this micro-batch's gradient.

    Returns:
        The new running total.
    """
    if grad is None:  # a variable this stage holds but this call does not use
        return total
    if total is None:
        return SparseParts([grad]) if isinstance(grad, tf.IndexedSlices) else grad
    if isinstance(total, SparseParts):
        if isinstance(grad, tf.IndexedSlices):
            return SparseParts([*total, grad])
        total = combine_sparse(total)
    return tf.convert_to_tensor(total) + tf.convert_to_tensor(grad)



def combine_sparse(parts: Any) -> Any:
    """One IndexedSlices with the structure a full batch would give.

    Keras's optimizers square slices before summing duplicates (Adam's v), so the structure
    matters: a gather on per-sample ids gives one slice per id, so micro-batches are
    concatenated; a gather on the same ids in every micro-batch (a position table) gives one
    slice per id, so values are added when every micro-batch's indices are equal (checked in
    the graph).

    Args:
        parts: a `SparseParts`, or any other gradient (returned as is).
    """
    if not isinstance(parts, SparseParts):
        return parts
    if len(parts) == 1:
        return parts[0]
    values, indices = concat_slices(parts)
    lengths = tf.stack([tf.shape(p.indices)[0] for p in parts])
    return combine_listed(values, indices, lengths, parts[0].dense_shape)


def combine_listed(values: tf.Tensor, indices: tf.Tensor, lengths: tf.Tensor,
                   dense_shape: tf.Tensor) -> tf.IndexedSlices:
    """`combine_sparse` of M micro-batches' IndexedSlices given concatenated (as the rank loops
    keep them in TensorLists, and `combine_sparse` concatenates them): `lengths[m]` slices
    each, in micro-batch order.

    With a constant number of operations whatever M: the values are added when every
    micro-batch's indices are equal, else kept one after another.
    """
    m, first = tf.size(lengths), lengths[0]

    def all_equal() -> tf.Tensor:
        rows = tf.reshape(indices, tf.stack([m, -1]))
        return tf.reduce_all(tf.equal(rows, rows[:1]))

    same = tf.cond(tf.reduce_all(tf.equal(lengths, first)), all_equal,
                   lambda: tf.constant(False))

    def summed() -> tuple[tf.Tensor, tf.Tensor]:
        shape = tf.concat([tf.stack([m, tf.cast(first, tf.int32)]), tf.shape(values)[1:]], 0)
        return tf.reduce_sum(tf.reshape(values, shape), 0), indices[:first]

    summed_values, kept = tf.cond(same, summed, lambda: (values, indices))
    return tf.IndexedSlices(summed_values, kept, dense_shape)


def sum_uses(a: Any, b: Any) -> Any:
    """Sums the gradients of one variable from two stages that use it, as TensorFlow sums the
    gradients of two uses: IndexedSlices are concatenated, anything else is added densely
    (None, from a stage that holds the variable but does not use it, adds nothing)."""
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, tf.IndexedSlices) and isinstance(b, tf.IndexedSlices):
        return tf.IndexedSlices(*concat_slices([a, b]), a.dense_shape)
    return tf.convert_to_tensor(a) + tf.convert_to_tensor(b)


def concat_slices(parts: list[tf.IndexedSlices]) -> tuple[tf.Tensor, tf.Tensor]:
    """Values and indices of several IndexedSlices, one after another."""
    return tf.concat([p.values for p in parts], 0), tf.concat([p.indices for p in parts], 0)


def dense(tensors: list[Any]) -> list[tf.Tensor]:
    """Plain tensors standing for `tensors` (slices' values), for control dependencies."""
    out = []
    for t in tensors:
        for part in t if isinstance(t, SparseParts) else [t]:
            if part is not None:
                out.append(part.values if isinstance(part, tf.IndexedSlices) else part)
    return out


def dense_leaves(structure: Any) -> list[tf.Tensor]:
    """`dense` of the flattened `structure`."""
    return dense(keras.tree.flatten(structure))


class GradSums:
    """The running weight-gradient sums of one training step, per replica and stage.

    Args:
        stages: the model's stages.
        replicas: how many copies of the pipeline run; row `r * K + s` is replica r's stage s.
        micro_batches: M, the micro-batches of one replica (replica r runs `r*M .. r*M+M-1`).
        add_all: adds lists of dense tensors pairwise (`sum_function()`, kept by the executor
            so that its traces live as long as the pipeline, not the process).
    """

    def __init__(
        self, stages: list[Stage], replicas: int, micro_batches: int, add_all: Any
    ) -> None:
        self.add_all = add_all
        self.num_stages = len(stages)
        self.micro_batches = micro_batches
        self.rows: list[list[Any]] = [
            [None] * len(s.trainable_variables) for _ in range(replicas) for s in stages
        ]

    def add(self, stage: int, micro_batch: int, grads: list[Any]) -> list[Any]:
        """Adds one micro-batch's weight gradients of `stage`; returns the stage's new sums.

        A dense gradient of more than `OWN_SUM` elements is added in the step's graph, where
        the runtime writes the sum into the running sum's buffer; the smaller ones are one
        call of `add_all` (one function per stage, not one addition per variable in the
        step's graph). In a function the sum is always a new buffer: with the large ones
        there too, 1F1B of the 8 x Dense(1024) MLP on two one-core workers (batch 2048,
        M = 8) was 3 % slower, its sequential accumulation on one core 5 % slower
        (docs/benchmarks.md).
        """
        k = (micro_batch // self.micro_batches) * self.num_stages + stage  # this replica's stage
        row = self.rows[k]
        dense = [i for i, (t, g) in enumerate(zip(row, grads)) if _dense(t) and _dense(g)]
        large = [i for i in dense if (row[i].shape.num_elements() or 0) > OWN_SUM]
        small = [i for i in dense if i not in large]
        summed = dict(zip(small, self.add_all([row[i] for i in small], [grads[i] for i in small])
                          if small else []))
        summed.update(zip(large, _sum_pairs([row[i] for i in large], [grads[i] for i in large])))
        self.rows[k] = [summed[i] if i in summed else accumulate(total, g)
                        for i, (total, g) in enumerate(zip(row, grads))]
        return list(self.rows[k])


def _dense(value: Any) -> bool:
    return tf.is_tensor(value) and not isinstance(value, (tf.IndexedSlices, SparseParts))


def _sum_pairs(totals: list[tf.Tensor], grads: list[tf.Tensor]) -> list[tf.Tensor]:
    return [t + tf.cast(g, t.dtype) for t, g in zip(totals, grads)]


def sum_function() -> Any:
    """A function adding two lists of dense tensors pairwise, traced once per stage (its
    variables' shapes) and not inlined, like the stage functions (`tfpipe.executor.stagefn`).

    Each pipeline makes its own: a remote worker keeps every function a client ran until the
    client frees it, and a module-level one would be freed only at exit, after the workers
    may be gone (TensorFlow then logs "Failed to remove function remotely").
    """
    return tf.function(_sum_pairs, autograph=False, reduce_retracing=True,
                       experimental_attributes={"_noinline": True})


def all_reduce(reducer: ReplicaReducer | None, sums: GradSums) -> list[list[Any]]:
    """Per stage, the gradients summed over replicas on copy 0's device (`sums.rows` holds R
    rows of K stages)."""
    k = sums.num_stages
    if reducer is None:
        return sums.rows
    out = []
    for s in range(k):
        rows = [sums.rows[r * k + s] for r in range(reducer.replicas)]
        with tf.name_scope(f"stage{s}_reduce"):
            summed = reducer.reduce(s, rows)
        out.append([SparseParts(g) if isinstance(g, list) else g for g in summed])
    return out


def apply_gradients(
    model: keras.Model, stages: list[Stage], owner: dict[int, int], grads: list[list[Any]]
) -> None:
    """One optimizer step over all stages, in `model.trainable_variables` order.

    A variable used by several stages gets the sum of their gradients, added on the
    device of the stage that owns it.

    Args:
        model: the user's model (its optimizer applies the step).
        stages: the model's stages.
        owner: `id(variable)` -> index of the stage that owns it.
        grads: per stage, the gradients of its `trainable_variables`.
    """
    by_var: dict[int, Any] = {}
    for stage, stage_grads in zip(stages, grads):
        with tf.device(stage.device):
            stage_grads = [combine_sparse(g) for g in stage_grads]
        for v, g in zip(stage.trainable_variables, stage_grads):
            if id(v) in by_var:
                with tf.device(stages[owner[id(v)]].device):
                    by_var[id(v)] = sum_uses(by_var[id(v)], g)
            else:
                by_var[id(v)] = g
    variables = model.trainable_variables
    with ops_follow_their_data():
        model.optimizer.apply_gradients([(by_var[id(v)], v) for v in variables])
