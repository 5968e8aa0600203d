"""Interprets a schedule as Keras train/test/predict steps: per-stage forward and VJP per device.

Design:
- One source of truth: the executor never hard-codes an order. It traces the schedule's
  actions in the order of `schedules.clock`, so every input an action needs exists when it is
  traced, and the dataflow graph is exactly the schedule's dependency graph.
- Per-stage backward: the forward of stage s on micro-batch m is recorded by its own
  `GradientTape` under `tf.device(stage.device)`; its `B` action asks that tape for the
  vector-Jacobian product with the gradient arriving from stage s+1, again under the stage's
  device. One tape around the whole forward would put the backward on the caller's device.
  Split backward (`I` then `W`, zero-bubble schedules) asks a persistent tape twice: first
  for the input gradient (which unblocks stage s-1), later for the weight gradient.
- Keeping the schedule's promises with few dependencies: dataflow alone already orders
  actions that consume each other's results. What it does not do is hold back a forward
  until the backward that the schedule put before it on the same rank has run, and that is
  what bounds in-flight activations (1F1B: stage s starts F(m+K-s) only after B(m)). So each
  `F` gets one control dependency: on the latest backward-type action (`B`, `I` or `W`)
  before it on its rank, if any. GPipe gets none, 1F1B gets exactly the warm-up bound.
- Accumulation sums each stage's weight gradients over micro-batches on the stage's device
  (IndexedSlices keep the structure a full batch would give, see `combine_sparse`); then the
  model's own optimizer applies one
  step to all variables at once, so the step counter, learning-rate schedule and any global
  gradient clipping see one step, as in `model.fit`.
- Losses and metrics are Keras's own: the compiled loss per micro-batch, weighted so the
  micro-batches add up to the batch loss; the compiled metrics updated per micro-batch; the
  loss tracker updated once per batch with the batch loss and size.
- These functions replace `train_step` / `test_step` / `predict_step`, the seam Keras offers
  for custom steps, so `model.fit` keeps its data adapters, callbacks, progress bar, History
  and validation, and traces the step once as a `tf.function`.
- Profiling (`profile=True`) brackets each action with `tf.timestamp()` ops tied to its
  inputs and outputs and stores them in a variable, so one step's measured timeline can be
  read back and drawn beside the simulated one. A bare `tf.timestamp` is a stateful op
  without resource inputs, which `tf.function` runs in program order, one after another
  over all devices: that serialised the whole step. A stamp taken only when its inputs are
  ready is no better: on a busy device an action's start stamp then fires long before its
  ops get their turn. So each stamp is a small function that also increments a counter
  variable of its device: writes to one resource run in program order, so the stamps and
  actions of one device run in the schedule's order, one after another (as the device runs
  them anyway), while devices stay free of each other.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf
from keras.src.losses.loss import unscale_loss_for_distribution

from tfpipe.errors import PipelineError
from tfpipe.executor.inputs import check_input_dtypes
from tfpipe.executor.microbatch import MicroBatches, loss_reduction
from tfpipe.executor.numerics import call_checked, check_gradients
from tfpipe.executor.replicas import ReplicaReducer
from tfpipe.partition import Stage
from tfpipe.partition.graph import model_io
from tfpipe.partition.stages import check_gradient_path
from tfpipe.placement import owners
from tfpipe.schedules import Action, Schedule, clock

Key = tuple[int, int]


class SparseParts(list[Any]):
    """The IndexedSlices gradients of one variable from several micro-batches, combined by
    `combine_sparse` once all are known."""


def _accumulate(total: Any, grad: Any) -> Any:
    """Adds a micro-batch's gradient of one variable to the running total.

    Dense gradients are summed as they come. IndexedSlices (embedding gradients) are kept per
    micro-batch and combined by `combine_sparse` at the end.
    """
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
    """
    if not isinstance(parts, SparseParts):
        return parts
    if len(parts) == 1:
        return parts[0]
    first = parts[0].indices

    def equal(indices: tf.Tensor) -> tf.Tensor:
        same_shape = tf.reduce_all(tf.equal(tf.shape(indices), tf.shape(first)))
        return tf.cond(
            same_shape, lambda: tf.reduce_all(tf.equal(indices, first)), lambda: tf.constant(False)
        )

    all_equal = tf.reduce_all(tf.stack([equal(p.indices) for p in parts[1:]]))
    values, indices = tf.cond(
        all_equal,
        lambda: (tf.add_n([p.values for p in parts]), first),
        lambda: _concat_slices(parts),
    )
    return tf.IndexedSlices(values, indices, parts[0].dense_shape)


def _sum_uses(a: Any, b: Any) -> Any:
    """Sums the gradients of one variable from two stages that use it, as TensorFlow sums the
    gradients of two uses: IndexedSlices are concatenated, anything else is added densely."""
    if isinstance(a, tf.IndexedSlices) and isinstance(b, tf.IndexedSlices):
        return tf.IndexedSlices(*_concat_slices([a, b]), a.dense_shape)
    return tf.convert_to_tensor(a) + tf.convert_to_tensor(b)


def _concat_slices(parts: list[tf.IndexedSlices]) -> tuple[tf.Tensor, tf.Tensor]:
    """Values and indices of several IndexedSlices, one after another."""
    return tf.concat([p.values for p in parts], 0), tf.concat([p.indices for p in parts], 0)


def _graph_inputs(stage: Stage) -> list[Any]:
    """`stage.inputs`, which every stage of a graph (not opaque) model has."""
    assert stage.inputs is not None, f"stage {stage.index} of a graph model has no inputs"
    return stage.inputs


def _graph_outputs(stage: Stage) -> list[Any]:
    """`stage.outputs`, which every stage of a graph (not opaque) model has."""
    assert stage.outputs is not None, f"stage {stage.index} of a graph model has no outputs"
    return stage.outputs


def _float_leaves(structure: Any) -> list[tf.Tensor]:
    return [t for t in keras.tree.flatten(structure) if t is not None and t.dtype.is_floating]


def _dense(tensors: list[Any]) -> list[tf.Tensor]:
    """Plain tensors standing for `tensors` (slices' values), for control dependencies."""
    out = []
    for t in tensors:
        for part in t if isinstance(t, SparseParts) else [t]:
            if part is not None:
                out.append(part.values if isinstance(part, tf.IndexedSlices) else part)
    return out


def rank_waits(schedule: Schedule, kinds: str = "F") -> dict[Action, Action]:
    """For each action of `kinds`, the latest backward-type action (`B`, `I`, `W`) before it on
    its rank, if any.

    With `kinds="F"`: the one dependency that bounds in-flight activations. With
    `kinds="BI"`: used only for recomputed stages, where a replay holds a micro-batch's
    activations, so replays on one rank run one after another, in the schedule's order.
    """
    waits: dict[Action, Action] = {}
    for actions in schedule.ranks:
        latest = None
        for a in actions:
            if a.kind in kinds and latest is not None:
                waits[a] = latest
            if a.kind != "F":
                latest = a
    return waits


@dataclass
class _Recorded:
    """What a stage's forward on one micro-batch left for its backward.

    With recomputation `tape` is None and `replay` holds the stage inputs, their ids and the
    stage's non-trainable state before the forward, for `_replay`.

    `targets` are the stage's float outputs that other stages consume (ids in `target_ids`)
    followed by its loss terms; `seeds`, set by an `I` action for its `W`, are their output
    gradients: the gradients the consumers sent back, then ones for the loss terms.
    """

    tape: tf.GradientTape | None
    watched: list[tf.Tensor]
    watched_ids: list[int]
    targets: list[tf.Tensor]
    target_ids: list[int]
    seeds: list[tf.Tensor]
    replay: tuple[list[Any], list[Any], list[tf.Tensor]] | None = None


@dataclass
class _StepState:
    """Trace-time bookkeeping of one step.

    `values` and `input_grads` are keyed by (micro-batch, id of a KerasTensor of the user's
    graph): the value of that tensor for that micro-batch, and the sum of the gradients that
    its consumer stages sent back for it. `recorded` is keyed by (stage, micro-batch).
    """

    mb: MicroBatches
    grads: list[list[Any]]
    values: dict[Key, Any] = field(default_factory=dict)
    input_grads: dict[Key, Any] = field(default_factory=dict)
    recorded: dict[Key, _Recorded] = field(default_factory=dict)
    losses: list[tf.Tensor] = field(default_factory=list)
    done: dict[Action, list[tf.Tensor]] = field(default_factory=dict)
    stamps: list[tf.Tensor] = field(default_factory=list)
    device: str = ""


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

    Attributes:
        traces: how many times each step kind was traced (`"train"`, `"test"`, `"predict"`);
            Python code in a `tf.function` runs once per trace.
        produced: from the latest training trace, the symbolic tensors each action made
            (`F`: the stage outputs and loss terms; `B`/`I`/`W`: gradients), for checking
            their devices.
        waits: the one control dependency each forward gets (see the module docstring).
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
    ) -> None:
        self.model = model
        self.stages = stages
        self.schedule = schedule
        self.micro_batches = schedule.num_micro_batches
        self.devices = [list(row) for row in replica_devices or [[st.device for st in stages]]]
        self.replicas = len(self.devices)
        self.reducer = ReplicaReducer(self.devices) if self.replicas > 1 else None
        self.order: list[Action] = [a for _, a in clock(schedule)]
        # (replica, action) in program order; replica r's actions name its micro-batches
        # r*M .. r*M+M-1 of the batch, so every key below is unique across replicas
        self.runs = [(r, self._shift(a, r)) for a in self.order for r in range(self.replicas)]
        self.forward_runs = [(r, a) for r, a in self.runs if a.kind == "F"]
        self.waits = self._replicated(rank_waits(schedule))
        self.replay_waits = self._replicated(rank_waits(schedule, kinds="BI"))
        self.recompute = list(recompute) if recompute is not None else [False] * len(stages)
        self.check_numerics = check_numerics
        self.made_by = {
            id(t): t._keras_history.operation.name for st in stages for t in (st.outputs or [])
        }
        # a model compiled only for prediction has no loss to split
        self.reduction = loss_reduction(model) if getattr(model, "compiled", False) else "sum"
        self.opaque = stages[0].inputs is None
        if not self.opaque:
            struct_in, struct_out = model_io(model)
            self.input_struct = struct_in
            self.input_ids = [id(t) for t in keras.tree.flatten(struct_in)]
            self.output_struct = struct_out
            self.output_ids = [id(t) for t in keras.tree.flatten(struct_out)]
            made_by = {id(t): st.index for st in stages for t in _graph_outputs(st)}
            last = len(stages) - 1
            # model outputs made before the last stage: its tape watches them for the loss
            self.early_outputs = [i for i in self.output_ids if made_by.get(i, last) != last]
        self.owner = owners(stages)
        self.traces: Counter[str] = Counter()
        self.produced: dict[Action, list[Any]] = {}
        self.stamps: tf.Variable | None = None
        self.clocks: dict[str, tuple[tf.Variable, Any]] = {}
        if profile:
            for device in {d for row in self.devices for d in row}:
                with tf.device(device):
                    var = tf.Variable(0.0, trainable=False, name="tfpipe_clock")

                @tf.function(autograph=False)  # type: ignore[untyped-decorator]
                def stamp(after: tf.Tensor, var: tf.Variable = var) -> tf.Tensor:
                    with tf.control_dependencies([after]):
                        tick = var.assign_add(1.0)
                    with tf.control_dependencies([tick]):
                        return tf.timestamp()

                self.clocks[device] = (var, stamp)
            self.stamps = tf.Variable(
                tf.zeros((len(self.runs), 2), tf.float64),
                trainable=False,
                name="tfpipe_action_times",
            )

    # Keras step functions -------------------------------------------------------------------

    def train_step(self, data: Any) -> dict[str, Any]:
        """One pipelined training step on a batch `(x, y[, sample_weight])` of size B.

        Returns:
            The model's metric results (`model.get_metrics_result()`), as Keras's own step.
        """
        self.traces["train"] += 1
        model = self.model
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        if y is None:
            raise PipelineError(
                f"The data gives inputs but no targets: model {model.name!r} is compiled with "
                f"loss {model.loss!r}, so each batch must be (x, y) or (x, y, sample_weight). "
                "Pass y=... with array inputs, or a dataset of (x, y) pairs."
            )
        mb = MicroBatches.split(x, y, sw, self.micro_batches * self.replicas, self.reduction)
        state = _StepState(
            mb, [[None] * len(s.trainable_variables) for _ in self.devices for s in self.stages]
        )
        self._feed(state)
        self.produced = {}
        run = {
            "F": self._forward,
            "B": self._backward,
            "I": self._input_grad,
            "W": self._weight_grad,
        }
        for r, action in self.runs:
            stage = self.stages[action.stage]
            state.device = self.devices[r][action.stage]
            with tf.device(state.device), tf.name_scope(self._scope(r, action)):
                produced = run[action.kind](action, stage, state)
            self.produced[action] = produced
            state.done[action] = _dense(produced)
        if self.stamps is not None:
            with tf.control_dependencies([t for ts in state.done.values() for t in ts]):
                self.stamps.assign(tf.reshape(tf.stack(state.stamps), (len(self.runs), 2)))
        self._apply(self._all_reduce(state.grads))
        total = tf.add_n(state.losses)
        model._loss_tracker.update_state(
            unscale_loss_for_distribution(total), sample_weight=mb.batch
        )
        metrics: dict[str, Any] = model.get_metrics_result()
        return metrics

    def test_step(self, data: Any) -> dict[str, Any]:
        """One pipelined forward-only evaluation step, as Keras's `test_step`."""
        self.traces["test"] += 1
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        mb = MicroBatches.split(x, y, sw, self.micro_batches * self.replicas, self.reduction)
        preds, losses = self._forward_only(mb, training=False)
        for m, out in enumerate(preds):
            with tf.device(self.devices[m // self.micro_batches][-1]):
                losses.append(self._data_loss(mb, m, out))
                self.model.compute_metrics(mb.xs[m], mb.ys[m], out, mb.sample_weights[m])
        total = tf.add_n(losses)
        self.model._loss_tracker.update_state(
            unscale_loss_for_distribution(total), sample_weight=mb.batch
        )
        metrics: dict[str, Any] = self.model.get_metrics_result()
        return metrics

    def predict_step(self, data: Any) -> Any:
        """One pipelined prediction step: the model outputs, concatenated over micro-batches."""
        self.traces["predict"] += 1
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        mb = MicroBatches.split(x, None, None, self.micro_batches * self.replicas, self.reduction)
        preds, _ = self._forward_only(mb, training=False)
        return keras.tree.map_structure(lambda *parts: tf.concat(parts, axis=0), *preds)

    # actions --------------------------------------------------------------------------------

    def _forward(self, action: Action, stage: Stage, state: _StepState) -> list[Any]:
        """F: run the stage on micro-batch m; the last stage adds the loss and metrics.

        Without recomputation the forward runs under a tape kept for the backward. With it,
        the forward runs without a tape (its activations are freed at once) and the backward
        replays it from the kept inputs and the stage's state as it was (`_replay`).
        """
        s, m = action.stage, action.micro_batch
        inputs, in_ids = self._inputs(stage, m, state, s == len(self.stages) - 1)
        wait = self.waits.get(action)
        before = state.done.get(wait, []) if wait is not None else []
        inputs = self._start(inputs, list(before), state)
        if self.recompute[s]:
            snapshot = [tf.identity(v.value) for v in stage.model.non_trainable_variables]
            outs, terms, rec = self._record(stage, m, inputs, in_ids, state, tape=None)
            rec.replay = (inputs, in_ids, snapshot)
        else:
            tape = tf.GradientTape(persistent=self.schedule.splits_backward(s))
            outs, terms, rec = self._record(stage, m, inputs, in_ids, state, tape=tape)
        state.losses.extend(terms)
        state.recorded[(s, m)] = rec
        produced: list[Any] = keras.tree.flatten(outs) + terms
        self._end(produced, state)
        return produced

    def _record(
        self,
        stage: Stage,
        m: int,
        inputs: list[Any],
        in_ids: list[Any],
        state: _StepState,
        tape: tf.GradientTape | None,
        replaying: bool = False,
    ) -> tuple[list[Any], list[tf.Tensor], _Recorded]:
        """Runs a stage's forward (under `tape` if given) and what its backward will need.

        Returns:
            The stage outputs, its weighted loss terms (data loss on the last stage, extra
            losses), and the `_Recorded` targets and seeds for its backward.
        """
        s = stage.index
        last = s == len(self.stages) - 1
        watched = [
            (i, v)
            for i, v in zip(in_ids, inputs)
            if not self.opaque and i not in self.input_ids and v.dtype.is_floating
        ]
        with tape if tape is not None else contextlib.nullcontext():
            if tape is not None:
                tape.watch([v for _, v in watched])
            outs = self._call(stage, inputs, training=True, micro_batch=m)
            if not replaying:
                self._publish(stage, m, outs, state)
            terms = []
            if last:
                y_pred = self._prediction(stage, m, outs, state, dict(zip(in_ids, inputs)))
                terms.append(self._data_loss(state.mb, m, y_pred))
                if not replaying:
                    self.model.compute_metrics(
                        state.mb.xs[m], state.mb.ys[m], y_pred, state.mb.sample_weights[m]
                    )
            extra = self._extra_loss(stage, state.mb, m)
            if extra is not None:
                terms.append(extra)
            scaled = [self.model.optimizer.scale_loss(t) for t in terms]
        if not last and not self.opaque:
            check_gradient_path(stage, self.stages, [v.dtype.name for v in outs])
        sent = (
            []
            if last
            else [
                (id(t), v) for t, v in zip(_graph_outputs(stage), outs) if v.dtype.is_floating
            ]
        )
        rec = _Recorded(
            tape,
            watched=[v for _, v in watched],
            watched_ids=[i for i, _ in watched],
            targets=[v for _, v in sent] + scaled,
            target_ids=[i for i, _ in sent],
            seeds=[],
        )
        return outs, terms, rec

    def _replay(
        self,
        action: Action,
        stage: Stage,
        rec: _Recorded,
        state: _StepState,
        seeds_ready: list[tf.Tensor],
    ) -> _Recorded:
        """Re-runs a recomputed stage's forward under a tape, as it ran the first time.

        The stage's non-trainable state (BatchNorm statistics, the seed generators that drive
        Dropout) is set back to its value before the first run, so the replay sees the same
        statistics and draws the same random masks, then restored, so the replay changes
        nothing. TensorFlow orders these reads and writes in program order. A replay starts
        when its output gradients have arrived and the previous backward on its rank is done.
        """
        if rec.replay is None:
            return rec
        inputs, in_ids, snapshot = rec.replay
        wait = self.replay_waits.get(action)
        before = state.done.get(wait, []) if wait is not None else []
        with tf.control_dependencies(_dense(seeds_ready) + list(before)):
            inputs = [tf.identity(v) for v in inputs]
        variables = stage.model.non_trainable_variables
        current = [tf.identity(v.value) for v in variables]
        for v, value in zip(variables, snapshot):
            v.assign(value)
        tape = tf.GradientTape(persistent=self.schedule.splits_backward(stage.index))
        _, _, replayed = self._record(
            stage, action.micro_batch, inputs, in_ids, state, tape=tape, replaying=True
        )
        for v, value in zip(variables, current):
            v.assign(value)
        return replayed

    def _backward(self, action: Action, stage: Stage, state: _StepState) -> list[Any]:
        """B: VJP of the stage's forward for its inputs and weights, in one pass."""
        rec = state.recorded.pop((action.stage, action.micro_batch))
        seeds = self._seeds(rec, action, state)
        rec = self._replay(action, stage, rec, state, seeds)
        seeds = self._start(seeds, self._forward_done(action, state), state)
        variables = stage.trainable_variables
        assert rec.tape is not None, "_replay gives a recomputed stage its tape"
        result = rec.tape.gradient(
            rec.targets,
            rec.watched + variables,
            output_gradients=seeds,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        n = len(rec.watched)
        produced = self._keep(action, state, rec, result[:n], result[n:])
        self._end(produced, state)
        return produced

    def _input_grad(self, action: Action, stage: Stage, state: _StepState) -> list[Any]:
        """I: VJP for the stage's inputs only, so the stages that made them can go on."""
        rec = state.recorded[(action.stage, action.micro_batch)]
        seeds = self._seeds(rec, action, state)
        rec = self._replay(action, stage, rec, state, seeds)
        state.recorded[(action.stage, action.micro_batch)] = rec
        rec.seeds = self._start(seeds, self._forward_done(action, state), state)
        result = []
        if rec.watched:
            assert rec.tape is not None, "_replay gives a recomputed stage its tape"
            result = rec.tape.gradient(
                rec.targets,
                rec.watched,
                output_gradients=rec.seeds,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
        produced = self._keep(action, state, rec, result, [])
        if not produced:  # nothing to send back (first stage): mark the action done all the same
            produced = [tf.identity(s) for s in rec.seeds[:1]]
        self._end(produced, state)
        return produced

    def _weight_grad(self, action: Action, stage: Stage, state: _StepState) -> list[Any]:
        """W: VJP for the stage's weights, deferred by the schedule into a bubble."""
        rec = state.recorded.pop((action.stage, action.micro_batch))
        seeds = self._start(
            rec.seeds, state.done[Action(action.stage, "I", action.micro_batch)], state
        )
        assert rec.tape is not None, "_replay gave a recomputed stage its tape at its I"
        result = rec.tape.gradient(
            rec.targets,
            stage.trainable_variables,
            output_gradients=seeds,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        del rec.tape
        produced = self._keep(action, state, rec, [], result)
        self._end(produced, state)
        return produced

    def _seeds(self, rec: _Recorded, action: Action, state: _StepState) -> list[tf.Tensor]:
        """Output gradients for the stage's targets: what its consumers sent, then the ones."""
        m = action.micro_batch
        sent = []
        for i, t in zip(rec.target_ids, rec.targets):
            g = state.input_grads.pop((m, i), None)
            sent.append(tf.zeros_like(t) if g is None else g)
        return sent + [tf.ones_like(t) for t in rec.targets[len(rec.target_ids) :]]

    def _keep(
        self,
        action: Action,
        state: _StepState,
        rec: _Recorded,
        input_grads: list[Any],
        weight_grads: list[Any],
    ) -> list[Any]:
        """Sends input gradients to the stages that made those inputs; sums weight gradients."""
        s, m = action.stage, action.micro_batch
        if self.check_numerics:
            input_grads, weight_grads = check_gradients(
                self.stages[s],
                m,
                action.kind,
                rec.watched_ids,
                input_grads,
                weight_grads,
                self.made_by,
            )
        for i, g in zip(rec.watched_ids, input_grads):
            g = tf.convert_to_tensor(g)
            prev = state.input_grads.get((m, i))
            state.input_grads[(m, i)] = g if prev is None else prev + g
        if weight_grads:
            k = (m // self.micro_batches) * len(self.stages) + s  # this replica's stage s
            state.grads[k] = [_accumulate(t, g) for t, g in zip(state.grads[k], weight_grads)]
            return list(input_grads) + list(state.grads[k])
        return list(input_grads)

    # profiling hooks --------------------------------------------------------------------------

    def _start(self, inputs: Any, after: list[tf.Tensor], state: _StepState) -> Any:
        """Holds an action's `inputs` until `after` ran; with profiling, stamps its start.

        Args:
            inputs: what the action consumes: a forward's input structure, or the output
                gradients (seeds) of a backward-type action.
            after: tensors of the action that must run first (on this rank, by the schedule).
            state: the step's bookkeeping (receives the start stamp).

        Returns:
            `inputs`, passed through `tf.identity` under the gate when there is one, so the
            action's compute cannot start before the gate (and the stamp) ran.
        """
        gate = list(after)
        if self.stamps is not None:
            stamp = self._timestamp(state, _dense(keras.tree.flatten(inputs)) + gate)
            state.stamps.append(stamp)
            gate = [stamp]
        if not gate:
            return inputs
        with tf.control_dependencies(gate):
            return keras.tree.map_structure(
                lambda t: tf.identity(t) if t is not None else None, inputs
            )

    def _forward_done(self, action: Action, state: _StepState) -> list[tf.Tensor]:
        """With profiling, what the forward of `action`'s stage and micro-batch made, so that
        a backward's start stamp is not taken before it: the last stage's output gradients
        are ones, which need nothing, though its backward needs the forward's activations."""
        if self.stamps is None:
            return []
        return list(state.done.get(Action(action.stage, "F", action.micro_batch), []))

    def _end(self, produced: list[Any], state: _StepState) -> None:
        if self.stamps is not None:
            state.stamps.append(self._timestamp(state, _dense(produced)))

    def _timestamp(self, state: _StepState, after: list[tf.Tensor]) -> tf.Tensor:
        """`tf.timestamp()` on the current action's device once `after` ran and after the
        earlier stamps of that device, but not those of other devices (module docstring).

        The stamp function gets `after` as a data input (a gated read of its clock), since
        control inputs of a function call do not reach ops inside it once it is inlined.
        """
        var, stamp = self.clocks[state.device]
        with tf.control_dependencies(after):
            token = tf.identity(var.read_value())
        return stamp(token)

    def timeline(self) -> list[tuple[int, Action, float, float]]:
        """Measured `(rank, action, start, end)` of the latest profiled step, ms from its start.

        Raises:
            ValueError: when the pipeline was built without `profile=True`.
        """
        if self.stamps is None:
            raise ValueError("No timeline: build the Pipeline with profile=True, then fit.")
        times = self.stamps.numpy()
        origin = times[:, 0].min()
        return [
            (
                r * self.schedule.num_ranks + self.schedule.rank_of(a.stage),
                a,
                1e3 * (t0 - origin),
                1e3 * (t1 - origin),
            )
            for (r, a), (t0, t1) in zip(self.runs, times)
        ]

    # replicas -------------------------------------------------------------------------------

    def _shift(self, action: Action, replica: int) -> Action:
        """`action` as replica `replica` runs it: on micro-batch `replica * M + m`."""
        return Action(action.stage, action.kind, action.micro_batch + replica * self.micro_batches)

    def _replicated(self, waits: dict[Action, Action]) -> dict[Action, Action]:
        """Per-rank waits of the schedule, for every replica's own actions."""
        return {
            self._shift(a, r): self._shift(w, r)
            for a, w in waits.items()
            for r in range(self.replicas)
        }

    def _scope(self, replica: int, action: Action) -> str:
        name = f"stage{action.stage}_{action.kind}{action.micro_batch}"
        return name if self.replicas == 1 else f"replica{replica}_{name}"

    def _all_reduce(self, grads: list[list[Any]]) -> list[list[Any]]:
        """Per stage, the gradients summed over replicas (`grads` holds R rows of K stages)."""
        k = len(self.stages)
        if self.reducer is None:
            return grads
        out = []
        for s in range(k):
            rows = [grads[r * k + s] for r in range(self.replicas)]
            with tf.name_scope(f"stage{s}_all_reduce"):
                summed = self.reducer.reduce(s, rows)
            out.append([SparseParts(g) if isinstance(g, list) else g for g in summed])
        return out

    # pieces ---------------------------------------------------------------------------------

    def _forward_only(self, mb: MicroBatches, training: bool) -> tuple[list[Any], list[tf.Tensor]]:
        """Runs the schedule's forward actions only.

        Returns:
            The model's predictions per micro-batch, and the stages' weighted extra losses.
        """
        state = _StepState(mb, [])
        self._feed(state)
        preds: list[Any] = [None] * (self.micro_batches * self.replicas)
        extras: list[tf.Tensor] = []
        last = len(self.stages) - 1
        for r, action in self.forward_runs:
            s, m = action.stage, action.micro_batch
            stage = self.stages[s]
            with tf.device(self.devices[r][s]), tf.name_scope(self._scope(r, action)):
                inputs, in_ids = self._inputs(stage, m, state, s == last)
                outs = self._call(stage, inputs, training=training, micro_batch=m)
                self._publish(stage, m, outs, state)
                if s == last:
                    preds[m] = self._prediction(stage, m, outs, state, dict(zip(in_ids, inputs)))
                extra = self._extra_loss(stage, mb, m)
                if extra is not None:
                    extras.append(extra)
        return preds, extras

    def _feed(self, state: _StepState) -> None:
        """Makes each micro-batch's model inputs available to the stages that consume them."""
        if self.opaque:
            return
        for m, x in enumerate(state.mb.xs):
            for i, v in zip(self.input_ids, self._flatten_inputs(x)):
                state.values[(m, i)] = v

    def _flatten_inputs(self, x: Any) -> list[Any]:
        """The data's inputs in the order of the model's input tensors (dicts by input name)."""
        flat_struct = keras.tree.flatten(self.input_struct)
        names = [t._keras_history.operation.name for t in flat_struct]
        if isinstance(x, dict) and not isinstance(self.input_struct, dict):
            missing = [n for n in names if n not in x]
            if missing:
                raise PipelineError(
                    f"The data's inputs are a dict with keys {sorted(x)}, but model "
                    f"{self.model.name!r} needs inputs named {names}; missing {missing}. "
                    "Name the dict keys after the model's keras.Input names."
                )
            flat: list[Any] = [x[n] for n in names]
        else:
            flat = keras.tree.flatten(x)
        if len(flat) != len(names):
            raise PipelineError(
                f"Model {self.model.name!r} takes {len(names)} input(s) {names}, but each data "
                f"element gives {len(flat)}: pass x as a tuple/list or dict of {len(names)} arrays."
            )
        check_input_dtypes(self.model.name, names, [t.dtype for t in flat_struct], flat)
        return flat

    def _inputs(
        self, stage: Stage, m: int, state: _StepState, last: bool
    ) -> tuple[list[Any], list[Any]]:
        """A stage's input values for micro-batch m and the ids of the tensors they stand for.

        The last stage also takes the model outputs that earlier stages made, for the loss.
        """
        if self.opaque:
            return [state.mb.xs[m]], [None]
        ids = [id(t) for t in _graph_inputs(stage)]
        if last:
            ids += [i for i in self.early_outputs if i not in ids]
        return [state.values[(m, i)] for i in ids], ids

    def _call(self, stage: Stage, inputs: list[Any], training: bool, micro_batch: int) -> list[Any]:
        """Calls the stage's sub-model (layer by layer, checked, with `check_numerics`)."""
        if self.opaque:
            return [stage.model(inputs[0], training=training)]
        inputs = inputs[: len(_graph_inputs(stage))]
        if self.check_numerics:
            outs = call_checked(stage, inputs, training, micro_batch)
        else:
            outs = stage.model(inputs, training=training)
        flat: list[Any] = keras.tree.flatten(outs)
        return flat

    def _publish(self, stage: Stage, m: int, outs: list[Any], state: _StepState) -> None:
        """Makes a stage's outputs for micro-batch m available to the stages that consume them."""
        if not self.opaque:
            for t, v in zip(_graph_outputs(stage), outs):
                state.values[(m, id(t))] = v

    def _prediction(
        self, stage: Stage, m: int, outs: list[Any], state: _StepState, local: dict[Any, Any]
    ) -> Any:
        """The model's output structure for micro-batch m, from the last stage's view of it."""
        if self.opaque:
            return outs[0]
        local = {**local, **{id(t): v for t, v in zip(_graph_outputs(stage), outs)}}
        return keras.tree.pack_sequence_as(self.output_struct, [local[i] for i in self.output_ids])

    def _data_loss(self, mb: MicroBatches, m: int, y_pred: Any) -> tf.Tensor:
        """Compiled loss of micro-batch m, weighted to its share of the batch loss."""
        loss = self.model._compile_loss(mb.ys[m], y_pred, mb.sample_weights[m])
        return loss * tf.cast(mb.data_scale[m], loss.dtype)

    def _extra_loss(self, stage: Stage, mb: MicroBatches, m: int) -> tf.Tensor | None:
        """The stage's `add_loss` / activity terms from its latest call and the regularisers of the
        variables it owns, weighted b_m / B (a variable shared by two stages counts once).

        Keras lists a model's losses as the layers' own terms followed by one weight
        regularisation term per regularised trainable variable.
        """
        terms = stage.model.losses
        regularised = [v for v in stage.trainable_variables if v.regularizer is not None]
        activity = terms[: len(terms) - len(regularised)]
        weights = [v.regularizer(v) for v in regularised if self.owner[id(v)] == stage.index]
        if not activity and not weights:
            return None
        total = tf.add_n([tf.cast(tf.reduce_sum(t), tf.float32) for t in activity + weights])
        return total * mb.extra_scale[m]

    def _apply(self, grads: list[list[Any]]) -> None:
        """One optimizer step over all stages, in `model.trainable_variables` order.

        A variable used by several stages gets the sum of their gradients, added on the
        device of the stage that owns it.
        """
        by_var: dict[int, Any] = {}
        for stage, stage_grads in zip(self.stages, grads):
            with tf.device(stage.device):
                stage_grads = [combine_sparse(g) for g in stage_grads]
            for v, g in zip(stage.trainable_variables, stage_grads):
                if id(v) in by_var:
                    with tf.device(self.stages[self.owner[id(v)]].device):
                        by_var[id(v)] = _sum_uses(by_var[id(v)], g)
                else:
                    by_var[id(v)] = g
        variables = self.model.trainable_variables
        self.model.optimizer.apply_gradients([(by_var[id(v)], v) for v in variables])
