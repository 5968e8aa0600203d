"""Interprets a schedule as Keras train/test/predict steps: per-stage forward and VJP per device.

Design:
- These functions replace `train_step` / `test_step` / `predict_step`, the seam Keras offers
  for custom steps, so `model.fit` keeps its data adapters, callbacks, progress bar, History
  and validation, and traces the step once as a `tf.function`.
- The training step walks the schedule's runs in trace order (`tfpipe.executor.program`) and
  dispatches each action to one small handler by its kind (`_HANDLERS`: `F`, `B`, `I`, `W`).
  Handlers pass values, gradients and tapes to later actions only through the step's
  `Dataflow` (`tfpipe.executor.dataflow`), run stages the Keras way through `StageRunner`
  (`tfpipe.executor.forward`), sum weight gradients in `GradSums` (`tfpipe.executor.grads`),
  and bracket their work with the profiling `Stamper` (`tfpipe.executor.profiling`), a no-op
  unless `profile=True`.
- Split backward (`I` then `W`, zero-bubble schedules): `I` runs the whole backward, input
  and weight gradients, and `W` has nothing left to compute. A stage runs as one function
  call (`tfpipe.executor.stagefn`), and the gradient TensorFlow makes for a call computes
  every input's and weight's gradient in one function, so an `I` asked for the input
  gradients alone cost a whole backward all the same, and a `W` asked the kept tape for the
  weight gradients, a second whole backward (two one-core workers: `B` 42-49 ms, `I` 43-44,
  `W` 43-44). Summed at `I`, the weight gradients cost nothing more and the tape (the
  activations) goes at once; the schedule's `W` stays an action, stamped when profiled,
  done once its `I` is.
- With replicas, each copy past the first reads each stage's weights once, before the first
  action (`tfpipe.executor.weights`), and its handlers run its stages on that read.
- After the last action, the sums are reduced over replicas and the model's own optimizer
  applies one step to all variables (`tfpipe.executor.grads`); the loss tracker is updated
  once per batch with the batch loss and size.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import keras
import tensorflow as tf

from tfpipe._keras import functions, layer_name_of, loss_tracker, unscale_loss
from tfpipe.devices import HOST, processes
from tfpipe.errors import PipelineError
from tfpipe.executor.batchnorm import DeferredBatchNorm
from tfpipe.executor.dataflow import Dataflow, Recorded
from tfpipe.executor.forward import StageRunner
from tfpipe.executor.grads import GradSums, all_reduce, apply_gradients, dense, sum_function, vjp
from tfpipe.executor.microbatch import MicroBatches, Shares, loss_reduction
from tfpipe.executor.numerics import check_gradients
from tfpipe.executor.profiling import stamper, timeline
from tfpipe.executor.program import Program, scope_name
from tfpipe.executor.rankloop import RankLoops, loops_refusal
from tfpipe.executor.replicas import ReplicaReducer
from tfpipe.executor.steadyloop import SteadyLoop
from tfpipe.executor.weights import read_replica_weights
from tfpipe.partition import Stage
from tfpipe.schedules import Action, Schedule, format_schedule

__all__ = ["Executor"]


class _At(NamedTuple):
    """Where a handler runs: the (replica-shifted) action, its stage and its device, and the
    replica's read of the stage's weights (None for copy 0, which reads the variables)."""

    action: Action
    stage: Stage
    device: str
    weights: list[tf.Tensor] | None = None


class Executor:
    """Runs one pipelined step of a Keras model from a schedule.

    Args:
        model: the user's compiled Keras model (its optimizer, loss, metrics are used).
        stages: the model's stages, stage k feeding stage k+1, variables already placed.
        schedule: a validated schedule for `len(stages)` stages.
        profile: record each action's start and end time in every training step.
        recompute: per stage, whether its forward is recomputed during its backward instead
            of keeping its activations.
        check_numerics: stop at the first NaN or Inf, naming the stage, the layer and the pass
            (see `tfpipe.executor.numerics`).
        replica_devices: `replica_devices[r][k]`, the device of stage k in replica r; None
            runs one copy on the stages' own devices.
        batch_norm: `"micro-batch"`, or `"deferred"`: BatchNormalization's moving statistics
            updated once per batch from all micro-batches (`tfpipe.executor.batchnorm`).
        jit_compile: compile each stage's forward (and so its backward) with XLA on its
            device (`tfpipe.executor.stagefn`).
        whole_step_xla: Keras compiles the whole step with XLA (`PipelineOptions.whole_step_xla`,
            unless a stage cannot be: `StageFunctions.compile_whole`): forwards traced inline.
        rank_loops: `"auto"`: the steady phase as one in-graph loop over all devices
            (`tfpipe.executor.steadyloop`: a graph that grows with K, not M x K) where it
            runs every feature asked for, without XLA, in one process, else unrolled;
            `"steady"`: that loop or an error; `True`: one loop per rank
            (`tfpipe.executor.rankloop`) or an error; `False`: the unrolled step.

    Attributes:
        traces: how many times each step kind was traced (`"train"`, `"test"`, `"predict"`);
            Python code in a `tf.function` runs once per trace.
        produced: from the latest training trace, the symbolic tensors each action made
            (`F`: the stage outputs and loss terms; `B`/`I`/`W`: gradients), for checking
            their devices.
        program: the schedule as runs in trace order, with the one control dependency each
            forward gets (`program.waits`, see `tfpipe.executor.program`).
        stamps: with `profile=True`, the variable of each run's `(start, end)`; else None.
    """

    def __init__(
        self,
        model: keras.Model,
        stages: list[Stage],
        schedule: Schedule,
        profile: bool = False,
        recompute: Sequence[bool] | None = None,
        check_numerics: bool = False,
        replica_devices: Sequence[Sequence[str]] | None = None,
        batch_norm: str = "micro-batch",
        jit_compile: bool = False,
        rank_loops: bool | str = False,
        whole_step_xla: bool = False,
    ) -> None:
        self.model = model
        self.stages = stages
        self.schedule = schedule
        self.micro_batches = schedule.num_micro_batches
        self.devices = [list(row) for row in replica_devices or [[st.device for st in stages]]]
        self.replicas = len(self.devices)
        self.reducer = ReplicaReducer(self.devices) if self.replicas > 1 else None
        self.program = Program.build(schedule, self.replicas)
        self.recompute = list(recompute) if recompute is not None else [False] * len(stages)
        self.check_numerics = check_numerics
        self.made_by = {
            id(t): layer_name_of(t) for st in stages for t in (st.outputs or [])
        }
        # a model compiled only for prediction has no loss to split
        self.reduction = loss_reduction(model) if getattr(model, "compiled", False) else "sum"
        self.deferred = DeferredBatchNorm(stages) if batch_norm == "deferred" else None
        self.runner = StageRunner(model, stages, check_numerics, self.deferred, jit_compile,
                                  inline=whole_step_xla)
        self.whole_step_xla = self.runner.functions.inline
        self.add_all = sum_function()  # the step's dense gradient sums
        self.traces: Counter[str] = Counter()
        self.produced: dict[Action, list[Any]] = {}
        devices = {d for row in self.devices for d in row}
        self.stamper = stamper(profile, devices, len(self.program.runs))
        self.loops: RankLoops | None = None
        self.rank_loops = rank_loops
        steady, auto = rank_loops in ("auto", "steady"), rank_loops == "auto"
        refusal = loops_refusal(self.runner, stages, schedule, {
            "replicas": self.replicas > 1, "recompute": any(self.recompute), "profile": profile,
            "check_numerics": check_numerics, "batch_norm='deferred'": self.deferred is not None,
            "jit_compile by default": jit_compile and auto,  # both slower: docs/benchmarks.md
            "stages in several processes by default": auto and processes(self.devices[0]) > 1,
            }, steady=steady) if rank_loops else None
        if rank_loops in (True, "steady") and refusal:
            raise PipelineError(
                f"rank_loops={rank_loops!r}: {refusal}. Use rank_loops='auto' or False (the "
                "unrolled step runs every feature).\n" + format_schedule(schedule))
        if rank_loops and refusal is None:
            self.loops = (SteadyLoop if steady else RankLoops)(self.runner, stages, schedule)

    @property
    def stamps(self) -> tf.Variable | None:
        """The profiling stamps variable (`profile=True`), or None."""
        return self.stamper.stamps

    # Keras step functions -------------------------------------------------------------------

    def train_step(self, data: Any) -> dict[str, Any]:
        """One pipelined training step on a batch `(x, y[, sample_weight])` of size B; returns
        the model's metric results (`model.get_metrics_result()`), as Keras's own step."""
        self.traces["train"] += 1
        with functions.stage_options():  # the stage functions: all of Grappler
            return self._train_step(data)

    def glue_options(self) -> contextlib.AbstractContextManager[None]:
        """How the step's own graph (glue around the stage calls) is optimised: by Grappler's
        dependency optimiser alone (`_keras.functions.glue_only`), but with all of Grappler
        where Keras compiles the step whole with XLA (its forwards are traced inline)."""
        return contextlib.nullcontext() if self.whole_step_xla else functions.glue_only()

    def _loop_step(self, x: Any, y: Any, sw: Any) -> dict[str, Any]:
        assert self.loops is not None
        with tf.device(HOST):
            shares = Shares.of(x, sw, self.micro_batches, self.reduction)
            inputs = self.runner.flatten_inputs(x)
        losses, grads = self.loops(shares, inputs, y, sw, x)
        with tf.control_dependencies(losses):  # no update (weight decay) before any read
            apply_gradients(self.model, self.stages, self.runner.owner, grads)
        return self._results(losses, shares.batch)

    def _train_step(self, data: Any) -> dict[str, Any]:
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        if y is None:
            raise PipelineError(
                f"The data gives inputs but no targets: model {self.model.name!r} is compiled "
                f"with loss {self.model.loss!r}, so each batch must be (x, y) or "
                "(x, y, sample_weight). Pass y=... with array inputs, or a dataset of (x, y) pairs."
            )
        if self.loops is not None:
            try:
                return self._loop_step(x, y, sw)
            except PipelineError:  # some refusals show only when the stages are traced
                if self.rank_loops != "auto":
                    raise
                self.loops = None
        flow = Dataflow(self._split(x, y, sw))
        sums = GradSums(self.stages, self.replicas, self.micro_batches, self.add_all)
        self.runner.feed(flow)
        self.produced = {}
        self.stamper.begin()
        weights = read_replica_weights(self.stages, self.devices)
        with self.deferred.deferring() if self.deferred else contextlib.nullcontext():
            for r, action in self.program.runs:
                s = action.stage
                at = _At(action, self.stages[s], self.devices[r][s], weights.get((r, s)))
                with tf.device(at.device), tf.name_scope(scope_name(r, action, self.replicas)):
                    produced = self._HANDLERS[action.kind](self, at, flow, sums)
                self.produced[action] = produced
                flow.mark_done(action, dense(produced))
        if self.deferred:
            self.deferred.update()
        self.stamper.finish(flow.all_done())
        apply_gradients(self.model, self.stages, self.runner.owner, all_reduce(self.reducer, sums))
        return self._results(flow.losses, flow.mb.batch)

    def test_step(self, data: Any) -> dict[str, Any]:
        """One pipelined forward-only evaluation step, as Keras's `test_step`."""
        self.traces["test"] += 1
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        mb = self._split(x, y, sw)
        preds, losses = self._forward_only(mb, training=False)
        for m, out in enumerate(preds):
            with tf.device(self.devices[m // self.micro_batches][-1]):
                losses.append(self.runner.data_loss(mb, m, out))
                self.model.compute_metrics(mb.xs[m], mb.ys[m], out, mb.sample_weights[m])
        return self._results(losses, mb.batch)

    def predict_step(self, data: Any) -> Any:
        """One pipelined prediction step: the model outputs, concatenated over micro-batches."""
        self.traces["predict"] += 1
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        preds, _ = self._forward_only(self._split(x, None, None), training=False)
        return keras.tree.map_structure(lambda *parts: tf.concat(parts, axis=0), *preds)

    def timeline(self) -> list[tuple[int, Action, float, float]]:
        """Measured `(rank, action, start, end)` of the latest profiled step, ms from its start.

        Raises:
            ValueError: when the pipeline was built without `profile=True`.
        """
        return timeline(self.stamps, self.schedule, self.program.runs)

    # pieces of the steps --------------------------------------------------------------------

    def _split(self, x: Any, y: Any, sw: Any) -> MicroBatches:
        """The batch as M micro-batches per replica, split on the host (`devices.HOST`), where
        the data arrives: each slice then goes straight to the stage that reads it (labels to
        the last), not through the default device (GPU:0 on a GPU machine) first."""
        with tf.device(HOST):
            return MicroBatches.split(x, y, sw, self.micro_batches * self.replicas, self.reduction)

    def _results(self, losses: list[tf.Tensor], batch: tf.Tensor) -> dict[str, Any]:
        """Updates the loss tracker once with the batch loss (B samples); returns the metric
        results."""
        total = tf.add_n(losses)
        loss_tracker(self.model).update_state(unscale_loss(total), sample_weight=batch)
        metrics: dict[str, Any] = self.model.get_metrics_result()
        return metrics

    def _forward_only(self, mb: MicroBatches, training: bool) -> tuple[list[Any], list[tf.Tensor]]:
        """Runs the schedule's forward actions only.

        Returns:
            The model's predictions per micro-batch, and the stages' weighted extra losses.
        """
        runner, flow = self.runner, Dataflow(mb)
        runner.feed(flow)
        preds: list[Any] = [None] * (self.micro_batches * self.replicas)
        extras: list[tf.Tensor] = []
        weights = read_replica_weights(self.stages, self.devices)
        for r, action in self.program.forward_runs:
            s, m = action.stage, action.micro_batch
            stage, own = self.stages[s], weights.get((r, s))
            with tf.device(self.devices[r][s]), tf.name_scope(scope_name(r, action, self.replicas)):
                inputs, in_ids = runner.inputs(stage, m, flow)
                outs = runner.call(stage, inputs, training=training, micro_batch=m, weights=own)
                runner.publish(stage, m, outs, flow)
                if s == runner.last:
                    preds[m] = runner.prediction(stage, outs, dict(zip(in_ids, inputs)))
                extra = runner.extra_loss(stage, mb, m, own)
                if extra is not None:
                    extras.append(extra)
        return preds, extras

    # action handlers ------------------------------------------------------------------------

    def _forward(self, at: _At, flow: Dataflow, sums: GradSums) -> list[Any]:
        """F: run the stage on micro-batch m; the last stage adds the loss and metrics.

        Without recomputation the forward runs under a tape kept for the backward. With it,
        the forward runs without a tape (its activations are freed at once) and the backward
        replays it from the kept inputs and the stage's state as it was (`StageRunner.replay`).
        """
        s, m, stage = at.action.stage, at.action.micro_batch, at.stage
        inputs, in_ids = self.runner.inputs(stage, m, flow)
        inputs = self.stamper.start(at.device, inputs, flow.done(self.program.waits.get(at.action)))
        if self.recompute[s]:
            snapshot = [tf.identity(v.value) for v in stage.model.non_trainable_variables]
            outs, terms, rec = self.runner.record(stage, m, inputs, in_ids, flow, tape=None,
                                                  weights=at.weights)
            rec.replay = (inputs, in_ids, snapshot)
        else:
            outs, terms, rec = self.runner.record(stage, m, inputs, in_ids, flow,
                                                  tape=tf.GradientTape(), weights=at.weights)
        flow.losses.extend(terms)
        flow.keep_forward(at.action, rec)
        produced: list[Any] = keras.tree.flatten(outs) + terms
        self.stamper.end(at.device, produced)
        return produced

    def _backward(self, at: _At, flow: Dataflow, sums: GradSums) -> list[Any]:
        """B, or the I of a split backward: VJP of the stage's forward for its inputs and
        weights, in one pass (module docstring: why an `I` takes the weight gradients too)."""
        rec, seeds = self._backward_inputs(at, flow)
        assert rec.tape is not None, "replay gives a recomputed stage its tape"
        params = rec.params(at.stage.trainable_variables)
        input_grads, weight_grads = vjp(rec.tape, rec.targets, rec.watched, params, seeds)
        produced = self._keep(at, flow, sums, rec, input_grads, weight_grads)
        if not produced:  # no input to send back nor weight (a weightless first stage)
            produced = [tf.identity(s) for s in seeds[:1]]
        self.stamper.end(at.device, produced)
        return produced

    def _weight_grad(self, at: _At, flow: Dataflow, sums: GradSums) -> list[Any]:
        """W: nothing left to compute, since its `I` summed the weight gradients. Its results
        are its `I`'s (stamped when profiled), so what the schedule holds behind this `W` (a
        forward: `rank_waits`) waits for that `I`."""
        after = flow.done(Action(at.action.stage, "I", at.action.micro_batch))
        held: list[Any] = self.stamper.start(at.device, after, [])
        self.stamper.end(at.device, held)
        return held

    _HANDLERS: ClassVar[dict[str, Callable[[Executor, _At, Dataflow, GradSums], list[Any]]]] = {
        "F": _forward, "B": _backward, "I": _backward, "W": _weight_grad}

    # helpers of the backward handlers -------------------------------------------------------

    def _backward_inputs(self, at: _At, flow: Dataflow) -> tuple[Recorded, list[Any]]:
        """Takes what the forward recorded and the output gradients (seeds) for a `B` or `I`.

        A recomputed stage is replayed once its seeds have arrived and the previous backward
        on its rank is done. The seeds come back held behind the start stamp, which (with
        profiling) also waits for the forward's results.
        """
        s, m, stage = at.action.stage, at.action.micro_batch, at.stage
        rec = flow.take_forward(at.action)
        seeds = self._seeds(rec, m, flow)
        wait = self.program.replay_waits.get(at.action)
        rec = self.runner.replay(stage, m, rec, flow, seeds + flow.done(wait))
        seeds = self.stamper.start(at.device, seeds, flow.done(self.program.gradient_waits.get(
            at.action)), ready=flow.done(Action(s, "F", m)))
        return rec, seeds

    def _seeds(self, rec: Recorded, m: int, flow: Dataflow) -> list[tf.Tensor]:
        """Output gradients for the stage's targets: what its consumers sent, then the ones."""
        sent = []
        for i, t in zip(rec.target_ids, rec.targets):
            g = flow.take_grad(m, i)
            sent.append(tf.zeros_like(t) if g is None else g)
        return sent + [tf.ones_like(t) for t in rec.targets[len(rec.target_ids) :]]

    def _keep(self, at: _At, flow: Dataflow, sums: GradSums, rec: Recorded,
              input_grads: list[Any], weight_grads: list[Any]) -> list[Any]:
        """Sends input gradients to the stages that made those inputs; sums weight gradients."""
        s, kind, m = at.action.stage, at.action.kind, at.action.micro_batch
        if self.check_numerics:
            input_grads, weight_grads = check_gradients(
                at.stage, m, kind, rec.watched_ids, input_grads, weight_grads, self.made_by
            )
        for i, g in zip(rec.watched_ids, input_grads):
            flow.send_grad(m, i, g)
        if weight_grads:
            return list(input_grads) + sums.add(s, m, weight_grads)
        return list(input_grads)

