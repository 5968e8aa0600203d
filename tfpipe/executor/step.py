"""Interprets a schedule into Keras train/test/predict steps: per-stage forward and VJP on each stage's device.

Design:
- One source of truth: the executor never hard-codes an order. It traces the schedule's
  actions in the order of `schedules.clock`, so every input an action needs exists when it is
  traced, and the resulting dataflow graph is exactly the schedule's dependency graph.
- Per-stage backward: the forward of stage s on micro-batch m is recorded by its own
  `GradientTape` under `tf.device(stage.device)`; its `B` action asks that tape for the
  vector-Jacobian product with the gradient arriving from stage s+1, again under the stage's
  device. One tape around the whole forward would put the backward on the caller's device.
- Accumulation sums each stage's weight gradients over micro-batches on the stage's device
  (IndexedSlices are concatenated, which is exact); then the model's own optimizer applies one
  step to all variables at once, so the step counter, learning-rate schedule and any global
  gradient clipping see one step, as in `model.fit`. Keras's TF optimizer colocates each
  variable's update with the variable.
- Losses and metrics are Keras's own: the compiled loss per micro-batch, weighted so the
  micro-batches add up to the batch loss; the compiled metrics updated per micro-batch; the
  loss tracker updated once per batch with the batch loss and size.
- These functions replace `train_step` / `test_step` / `predict_step`, the seam Keras offers
  for custom steps, so `model.fit` keeps its data adapters, callbacks, progress bar, History
  and validation, and traces the step once as a `tf.function`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import keras
import tensorflow as tf
from keras.src.losses.loss import unscale_loss_for_distribution

from tfpipe.executor.microbatch import MicroBatches, loss_reduction
from tfpipe.partition import Stage
from tfpipe.schedules import Action, Schedule, clock


def _accumulate(total: Any, grad: Any) -> Any:
    """Adds two gradients of one variable; IndexedSlices are concatenated (exact, sparse)."""
    if total is None:
        return grad
    if isinstance(total, tf.IndexedSlices) and isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(
            tf.concat([total.values, grad.values], 0),
            tf.concat([total.indices, grad.indices], 0),
            total.dense_shape,
        )
    return tf.convert_to_tensor(total) + tf.convert_to_tensor(grad)


def _float_leaves(structure: Any) -> list[tf.Tensor]:
    return [t for t in keras.tree.flatten(structure) if t is not None and t.dtype.is_floating]


class Executor:
    """Runs one pipelined step of a Keras model from a schedule.

    Args:
        model: the user's compiled Keras model (its optimizer, loss, metrics are used).
        stages: the model's stages, stage k feeding stage k+1, variables already placed.
        schedule: a validated schedule for `len(stages)` stages.

    Attributes:
        traces: how many times each step kind was traced (`"train"`, `"test"`, `"predict"`);
            Python code in a `tf.function` runs once per trace.
        produced: from the latest training trace, the symbolic tensors each action made
            (`F`: the stage outputs and loss terms; `B`: input and weight gradients), for
            checking their devices.
    """

    def __init__(self, model: keras.Model, stages: list[Stage], schedule: Schedule) -> None:
        self.model = model
        self.stages = stages
        self.schedule = schedule
        self.micro_batches = schedule.num_micro_batches
        self.order: list[Action] = [a for _, a in clock(schedule)]
        self.forward_order = [a for a in self.order if a.kind == "F"]
        self.reduction = loss_reduction(model)
        self.traces: Counter[str] = Counter()
        self.produced: dict[Action, list[Any]] = {}

    # Keras step functions -------------------------------------------------------------------

    def train_step(self, data: Any) -> dict[str, Any]:
        """One pipelined training step on a batch `(x, y[, sample_weight])` of size B.

        Returns:
            The model's metric results (`model.get_metrics_result()`), as Keras's own step.
        """
        self.traces["train"] += 1
        model = self.model
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        mb = MicroBatches.split(x, y, sw, self.micro_batches, self.reduction)
        last = len(self.stages) - 1
        outputs: dict[tuple[int, int], Any] = {}
        tapes: dict[tuple[int, int], tuple[tf.GradientTape, list, list, list]] = {}
        input_grads: dict[tuple[int, int], list[tf.Tensor]] = {}
        grads: list[list[Any]] = [[None] * len(s.trainable_variables) for s in self.stages]
        losses: list[tf.Tensor] = []
        self.produced = {}
        for action in self.order:
            s, m = action.stage, action.micro_batch
            stage = self.stages[s]
            with tf.device(stage.device), tf.name_scope(f"stage{s}_{action}"):
                if action.kind == "F":
                    inputs = mb.xs[m] if s == 0 else outputs.pop((s - 1, m))
                    tape = tf.GradientTape()
                    with tape:
                        watched = _float_leaves(inputs) if s > 0 else []
                        tape.watch(watched)
                        out = stage.model(inputs, training=True)
                        targets, seeds = [], []
                        if s == last:
                            loss = self._data_loss(mb, m, out)
                            model.compute_metrics(mb.xs[m], mb.ys[m], out, mb.sample_weights[m])
                        else:
                            outputs[(s, m)] = out
                            loss = None
                        extra = self._extra_loss(stage, mb, m)
                        for term in (loss, extra):
                            if term is not None:
                                losses.append(term)
                                scaled = model.optimizer.scale_loss(term)
                                targets.append(scaled)
                                seeds.append(tf.ones_like(scaled))
                    if s < last:
                        targets = _float_leaves(out) + targets
                    tapes[(s, m)] = (tape, watched, targets, seeds)
                    self.produced[action] = keras.tree.flatten(out) + targets
                else:
                    tape, watched, targets, seeds = tapes.pop((s, m))
                    if s < last:
                        seeds = input_grads.pop((s + 1, m)) + seeds
                    variables = stage.trainable_variables
                    result = tape.gradient(
                        targets,
                        watched + variables,
                        output_gradients=seeds,
                        unconnected_gradients=tf.UnconnectedGradients.ZERO,
                    )
                    if s > 0:
                        input_grads[(s, m)] = result[: len(watched)]
                    grads[s] = [_accumulate(t, g) for t, g in zip(grads[s], result[len(watched):])]
                    self.produced[action] = list(result) + list(grads[s])
        self._apply(grads)
        total = tf.add_n(losses)
        model._loss_tracker.update_state(
            unscale_loss_for_distribution(total), sample_weight=mb.batch
        )
        return model.get_metrics_result()

    def test_step(self, data: Any) -> dict[str, Any]:
        """One pipelined forward-only evaluation step, as Keras's `test_step`."""
        self.traces["test"] += 1
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        mb = MicroBatches.split(x, y, sw, self.micro_batches, self.reduction)
        preds, losses = self._forward(mb, training=False)
        for m, out in enumerate(preds):
            with tf.device(self.stages[-1].device):
                losses.append(self._data_loss(mb, m, out))
                self.model.compute_metrics(mb.xs[m], mb.ys[m], out, mb.sample_weights[m])
        total = tf.add_n(losses)
        self.model._loss_tracker.update_state(
            unscale_loss_for_distribution(total), sample_weight=mb.batch
        )
        return self.model.get_metrics_result()

    def predict_step(self, data: Any) -> Any:
        """One pipelined prediction step: the last stage's outputs, concatenated over micro-batches."""
        self.traces["predict"] += 1
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        mb = MicroBatches.split(x, None, None, self.micro_batches, self.reduction)
        preds, _ = self._forward(mb, training=False)
        return keras.tree.map_structure(lambda *parts: tf.concat(parts, axis=0), *preds)

    # pieces ---------------------------------------------------------------------------------

    def _forward(self, mb: MicroBatches, training: bool) -> tuple[list[Any], list[tf.Tensor]]:
        """Runs the schedule's forward actions only.

        Returns:
            The last stage's outputs per micro-batch, and the stages' weighted extra losses.
        """
        outputs: dict[tuple[int, int], Any] = {}
        extras: list[tf.Tensor] = []
        last = len(self.stages) - 1
        for action in self.forward_order:
            s, m = action.stage, action.micro_batch
            stage = self.stages[s]
            with tf.device(stage.device), tf.name_scope(f"stage{s}_{action}"):
                inputs = mb.xs[m] if s == 0 else outputs.pop((s - 1, m))
                outputs[(s, m)] = stage.model(inputs, training=training)
                extra = self._extra_loss(stage, mb, m)
                if extra is not None:
                    extras.append(extra)
        return [outputs[(last, m)] for m in range(self.micro_batches)], extras

    def _data_loss(self, mb: MicroBatches, m: int, y_pred: Any) -> tf.Tensor:
        """Compiled loss of micro-batch m, weighted to its share of the batch loss."""
        loss = self.model._compile_loss(mb.ys[m], y_pred, mb.sample_weights[m])
        return loss * tf.cast(mb.data_scale[m], loss.dtype)

    def _extra_loss(self, stage: Stage, mb: MicroBatches, m: int) -> tf.Tensor | None:
        """The stage's regulariser and `add_loss` terms from its latest call, weighted b_m / B."""
        terms = stage.model.losses
        if not terms:
            return None
        total = tf.add_n([tf.cast(tf.reduce_sum(t), tf.float32) for t in terms])
        return total * mb.extra_scale[m]

    def _apply(self, grads: list[list[Any]]) -> None:
        """One optimizer step over all stages, in `model.trainable_variables` order."""
        by_var = {
            id(v): g
            for stage, stage_grads in zip(self.stages, grads)
            for v, g in zip(stage.trainable_variables, stage_grads)
        }
        variables = self.model.trainable_variables
        self.model.optimizer.apply_gradients([(by_var[id(v)], v) for v in variables])
