"""Runs a stage's forward on a micro-batch the Keras way: its inputs, call, losses and tape.

Design:
- Per-stage backward: the forward of stage s on micro-batch m is recorded by its own
  `GradientTape` under `tf.device(stage.device)` (`record`); its backward asks that tape for
  the vector-Jacobian product with the gradient arriving from stage s+1, again under the
  stage's device. One tape around the whole forward would put the backward on the caller's
  device. A split backward's `I` asks it for both (`tfpipe.executor.step`).
- Recomputation runs the forward without a tape (its activations are freed at once) and the
  backward replays it (`replay`) from the kept inputs and the stage's state as it was.
- A replica past the first passes its one read of the stage's weights per step (`weights`,
  `tfpipe.executor.weights`): its calls, regularisers and tape use those tensors, and its
  `Recorded.weights` are what its weight gradients are taken for.
- Losses and metrics are Keras's own: the compiled loss per micro-batch, weighted so the
  micro-batches add up to the batch loss (`data_loss`); the compiled metrics updated per
  micro-batch; each stage's `add_loss` terms and the regularisers of the variables it owns
  (`extra_loss`). The loss tracker is updated once per batch by the step.
- Model inputs and outputs are matched by the ids of the user graph's KerasTensors, so a
  stage finds each value it needs in the step's `Dataflow` wherever it was made; an opaque
  (subclassed, single-stage) model just takes the micro-batch's `x`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import keras
import tensorflow as tf

from tfpipe._keras import compiled_loss, layer_name_of
from tfpipe.data import flatten_by_name
from tfpipe.errors import PipelineError
from tfpipe.executor.batchnorm import DeferredBatchNorm, collecting
from tfpipe.executor.dataflow import Dataflow, Recorded
from tfpipe.executor.grads import dense
from tfpipe.executor.inputs import check_input_dtypes
from tfpipe.executor.microbatch import MicroBatches
from tfpipe.executor.numerics import call_checked
from tfpipe.executor.stagefn import StageFunctions, warn_uncompiled
from tfpipe.executor.weights import reading
from tfpipe.partition import Stage
from tfpipe.partition.graph import read_graph
from tfpipe.partition.stages import check_gradient_path
from tfpipe.placement import owners


def graph_inputs(stage: Stage) -> list[Any]:
    """`stage.inputs`, which every stage of a graph (not opaque) model has."""
    assert stage.inputs is not None, f"stage {stage.index} of a graph model has no inputs"
    return stage.inputs


def graph_outputs(stage: Stage) -> list[Any]:
    """`stage.outputs`, which every stage of a graph (not opaque) model has."""
    assert stage.outputs is not None, f"stage {stage.index} of a graph model has no outputs"
    return stage.outputs


class StageRunner:
    """Runs the stages of one model on micro-batches, as Keras would run the whole model.

    Args:
        model: the user's Keras model (its compiled loss, metrics and optimizer are used).
        stages: the model's stages, stage k feeding stage k+1.
        check_numerics: call stages layer by layer, stopping at the first NaN or Inf.
        deferred: with `batch_norm="deferred"`, the pipeline's BatchNormalization layers,
            whose moments each training call records per micro-batch; else None.
        jit_compile: compile the stage functions with XLA (`StageFunctions`); the stages
            `check_numerics` runs layer by layer and an opaque model stay uncompiled, with a
            warning.
        inline: trace the stages' forwards inline, not as functions (a step Keras compiles
            whole with XLA; see `tfpipe.executor.stagefn`).
    """

    def __init__(
        self,
        model: keras.Model,
        stages: list[Stage],
        check_numerics: bool,
        deferred: DeferredBatchNorm | None = None,
        jit_compile: bool = False,
        inline: bool = False,
    ) -> None:
        self.model = model
        self.deferred = deferred
        self.losses: dict[int, list[Any]] = {}  # each stage's add_loss terms, latest call
        self.stages = stages
        self.last = len(stages) - 1
        self.check_numerics = check_numerics
        self.owner = owners(stages)
        self.opaque = stages[0].inputs is None
        self.input_ids: list[int] = []
        if not self.opaque:
            graph = read_graph(model)  # read when the model was split
            struct_in, struct_out = graph.inputs, graph.outputs
            self.input_struct = struct_in
            self.input_ids = [id(t) for t in keras.tree.flatten(struct_in)]
            self.output_struct = struct_out
            self.output_ids = [id(t) for t in keras.tree.flatten(struct_out)]
            made_by = {id(t): st.index for st in stages for t in graph_outputs(st)}
            # model outputs made before the last stage: its tape watches them for the loss
            early = [i for i in self.output_ids if made_by.get(i, self.last) != self.last]
            self.early_outputs = early
        self.functions = StageFunctions(deferred, jit_compile, inline, self.input_ids)
        if inline:
            self.functions.compile_whole(stages)
        if jit_compile and not self.functions.inline and (check_numerics or self.opaque):
            warn_uncompiled(stages, (
                f"tfpipe calls subclassed model {model.name!r} whole, not as a stage function"
                if self.opaque else "check_numerics=True calls each stage's layers one by one "
                "(to name the first that makes a NaN or Inf), not as a stage function"
            ))

    def feed(self, flow: Dataflow) -> None:
        """Makes each micro-batch's model inputs available to the stages that consume them."""
        if self.opaque:
            return
        for m, x in enumerate(flow.mb.xs):
            flow.publish(m, self.input_ids, self.flatten_inputs(x))

    def flatten_inputs(self, x: Any) -> list[Any]:
        """The data's inputs in the order of the model's input tensors (dicts by input name)."""
        flat_struct = keras.tree.flatten(self.input_struct)
        names = [layer_name_of(t) for t in flat_struct]
        flat, missing = flatten_by_name(x, names, not isinstance(self.input_struct, dict))
        if missing:
            raise PipelineError(
                f"The data's inputs are a dict with keys {sorted(x)}, but model "
                f"{self.model.name!r} needs inputs named {names}; missing {missing}. "
                "Name the dict keys after the model's keras.Input names."
            )
        if len(flat) != len(names):
            raise PipelineError(
                f"Model {self.model.name!r} takes {len(names)} input(s) {names}, but each data "
                f"element gives {len(flat)}: pass x as a tuple/list or dict of {len(names)} arrays."
            )
        check_input_dtypes(self.model.name, names, [t.dtype for t in flat_struct], flat)
        return flat

    def inputs(self, stage: Stage, m: int, flow: Dataflow) -> tuple[list[Any], list[Any]]:
        """A stage's input values for micro-batch m and the ids of the tensors they stand for.

        The last stage also takes the model outputs that earlier stages made, for the loss.
        """
        if self.opaque:
            return [flow.mb.xs[m]], [None]
        ids = [id(t) for t in graph_inputs(stage)]
        if stage.index == self.last:
            ids += [i for i in self.early_outputs if i not in ids]
        return flow.inputs_for(m, ids), ids

    def call(
        self,
        stage: Stage,
        inputs: list[Any],
        training: bool,
        micro_batch: int,
        weights: list[Any] | None = None,
    ) -> list[Any]:
        """Calls the stage's forward function (`StageFunctions`), or its layers one by one,
        checked, with `check_numerics`; keeps its `add_loss` terms and BatchNorm moments.

        `weights`: a replica's read of the stage's trainable variables, read in their place
        (`tfpipe.executor.weights.reading`); None reads the variables.
        """
        if self.opaque:  # opaque: one stage
            with reading(stage.model, stage.trainable_variables, weights):
                return [stage.model(inputs[0], training=training)]
        inputs = inputs[: len(graph_inputs(stage))]
        if self.check_numerics:
            with reading(stage.model, stage.trainable_variables, weights):
                with collecting(self.deferred) as records:
                    outs: list[Any] = keras.tree.flatten(
                        call_checked(stage, inputs, training, micro_batch)
                    )
                losses = list(stage.model.losses)
        else:
            outs, losses, records = self.functions(stage, inputs, training, weights)
        self.losses[stage.index] = losses
        if self.deferred:
            self.deferred.store(micro_batch, records)
        return outs

    def publish(self, stage: Stage, m: int, outs: list[Any], flow: Dataflow) -> None:
        """Makes a stage's outputs for micro-batch m available to the stages that consume them."""
        if not self.opaque:
            flow.publish(m, [id(t) for t in graph_outputs(stage)], outs)

    def prediction(self, stage: Stage, outs: list[Any], local: dict[Any, Any]) -> Any:
        """The model's output structure, from the last stage's inputs `local` and outputs."""
        if self.opaque:
            return outs[0]
        local = {**local, **{id(t): v for t, v in zip(graph_outputs(stage), outs)}}
        return keras.tree.pack_sequence_as(self.output_struct, [local[i] for i in self.output_ids])

    def data_loss(self, mb: MicroBatches, m: int, y_pred: Any) -> tf.Tensor:
        """Compiled loss of micro-batch m, weighted to its share of the batch loss."""
        loss = compiled_loss(self.model, mb.ys[m], y_pred, mb.sample_weights[m])
        return loss * tf.cast(mb.data_scale[m], loss.dtype)

    def extra_loss(
        self, stage: Stage, mb: MicroBatches, m: int, weights: list[Any] | None = None
    ) -> tf.Tensor | None:
        """The stage's `add_loss` / activity terms from its latest call and the regularisers of the
        variables it owns, weighted b_m / B (a variable shared by two stages counts once).

        Keras lists a model's losses as the layers' own terms followed by one weight
        regularisation term per regularised trainable variable. `weights`: a replica's read
        of the stage's trainable variables, regularised in their place (None: the variables).
        """
        return self.extra_terms(stage, self.losses.get(stage.index, []), mb.extra_scale[m],
                                weights)

    def extra_terms(
        self, stage: Stage, terms: list[Any], scale: Any, weights: list[Any] | None = None
    ) -> tf.Tensor | None:
        """`extra_loss` from a call's `add_loss` terms `terms`, weighted by `scale` (b_m / B)."""
        variables = stage.trainable_variables
        values = variables if weights is None else weights
        regularised = [(v, w) for v, w in zip(variables, values) if v.regularizer is not None]
        activity = terms[: len(terms) - len(regularised)]
        penalties = [v.regularizer(w) for v, w in regularised if self.owner[id(v)] == stage.index]
        if not activity and not penalties:
            return None
        total = tf.add_n([tf.cast(tf.reduce_sum(t), tf.float32) for t in activity + penalties])
        return total * scale

    def record(
        self,
        stage: Stage,
        m: int,
        inputs: list[Any],
        in_ids: list[Any],
        flow: Dataflow,
        tape: tf.GradientTape | None,
        replaying: bool = False,
        weights: list[Any] | None = None,
    ) -> tuple[list[Any], list[tf.Tensor], Recorded]:
        """Runs a stage's forward in training mode (under `tape` if given) and keeps what its
        backward will need.

        Args:
            stage: the stage.
            m: the micro-batch.
            inputs: the stage's input values, from `inputs`.
            in_ids: the ids of the graph tensors they stand for.
            flow: the step's dataflow (receives the outputs, unless `replaying`).
            tape: the tape to record under, or None (recomputation's first run).
            replaying: a recomputed stage's replay: publishes nothing, updates no metrics.
            weights: a replica's read of the stage's trainable variables (watched by the
                tape, read in their place), or None for the variables.

        Returns:
            The stage outputs, its weighted loss terms (data loss on the last stage, extra
            losses), and the `Recorded` targets and seeds for its backward.
        """
        last = stage.index == self.last
        watched = [
            (i, v)
            for i, v in zip(in_ids, inputs)
            if not self.opaque and i not in self.input_ids and v.dtype.is_floating
        ]
        with tape if tape is not None else contextlib.nullcontext():
            if tape is not None:
                tape.watch([v for _, v in watched] + list(weights or []))
            outs = self.call(stage, inputs, training=True, micro_batch=m, weights=weights)
            if not replaying:
                self.publish(stage, m, outs, flow)
            terms = []
            if last:
                y_pred = self.prediction(stage, outs, dict(zip(in_ids, inputs)))
                terms.append(self.data_loss(flow.mb, m, y_pred))
                if not replaying:
                    mb = flow.mb
                    self.model.compute_metrics(mb.xs[m], mb.ys[m], y_pred, mb.sample_weights[m])
            extra = self.extra_loss(stage, flow.mb, m, weights)
            if extra is not None:
                terms.append(extra)
            scaled = [self.model.optimizer.scale_loss(t) for t in terms]
        if not last and not self.opaque:
            check_gradient_path(stage, self.stages, [v.dtype.name for v in outs])
        sent = [] if last else [
            (id(t), v) for t, v in zip(graph_outputs(stage), outs) if v.dtype.is_floating
        ]
        rec = Recorded(
            tape,
            watched=[v for _, v in watched],
            watched_ids=[i for i, _ in watched],
            targets=[v for _, v in sent] + scaled,
            target_ids=[i for i, _ in sent],
            weights=weights,
        )
        return outs, terms, rec

    def replay(
        self,
        stage: Stage,
        m: int,
        rec: Recorded,
        flow: Dataflow,
        after: list[tf.Tensor],
    ) -> Recorded:
        """Re-runs a recomputed stage's forward under a tape, as it ran the first time.

        The stage's non-trainable state (BatchNorm statistics, the seed generators that drive
        Dropout) is set back to its value before the first run, so the replay sees the same
        statistics and draws the same random masks, then restored, so the replay changes
        nothing. TensorFlow orders these reads and writes in program order.

        Args:
            stage: the stage.
            m: the micro-batch.
            rec: what the forward recorded; returned as is when it kept a tape.
            flow: the step's dataflow.
            after: what the replay waits for: its output gradients and the previous backward
                on its rank.
        """
        if rec.replay is None:
            return rec
        inputs, in_ids, snapshot = rec.replay
        with tf.control_dependencies(dense(after)):
            inputs = [tf.identity(v) for v in inputs]
        variables = stage.model.non_trainable_variables
        current = [tf.identity(v.value) for v in variables]
        for v, value in zip(variables, snapshot):
            v.assign(value)
        tape = tf.GradientTape()
        _, _, replayed = self.record(stage, m, inputs, in_ids, flow, tape=tape, replaying=True,
                                     weights=rec.weights)
        for v, value in zip(variables, current):
            v.assign(value)
        return replayed
