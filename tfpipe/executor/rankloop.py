"""Rank loops: a training step as one in-graph loop per rank over its schedule row.

Design:
- Why: the unrolled step (`Executor.train_step` walking `program.runs`) has 3 x M x K call
  sites, each optimised before the first run: its first step grew with M (9.8x `model.fit`'s
  at K = 4, M = 64, 12-block Transformer, `benchmarks/trace_cost.py`). Here the graph grows
  with K only (2.6x at K = 8, M = 64, docs/benchmarks.md).
- Each stage's forward is one `tf.function` of (stage inputs, and on the last stage the
  micro-batch's labels, sample weights and loss weight), returning its outputs and loss
  terms. TensorFlow's own forward/backward pair for a call of it (`_keras.functions.
  forward_backward`) splits it: the forward also returns the residuals its backward reads, and
  the backward takes output gradients and residuals and returns input and weight gradients.
- Each rank runs its schedule row (`program.RankRows`) as one `tf.while_loop` on its device,
  one action per iteration (`parallel_iterations=1`: the schedule's order, and the queue reads
  in order), a `tf.switch_case` on the action's `(stage, kind)`; state is kept per stage of
  the rank (at its position `pos` among them). Dense weight gradients are summed in loop
  variables;
  IndexedSlices (embedding gradients) are kept per micro-batch in TensorLists and combined
  after the loop as the unrolled step combines them (`grads.combine_listed`), because Keras's
  optimizers square slices before summing duplicates. A micro-batch's residuals take one of
  its stage's slots from its forward to its backward (`program.RankRows.slots`,
  `tfpipe.executor.residuals`), and the next forward into a slot overwrites them, so a rank
  holds only its in-flight micro-batches' residuals (1F1B: at most K,
  `tests/test_schedule_memory.py`) with no operation to clear them.
- The stage functions are traced for the micro-batch size when the batch's size is known
  and M divides it (`stagepair.micro_size`): for an unknown size the gradients keep a
  broadcast reduction per broadcasting operation that Grappler removes for known shapes
  (steady step 1.24x the unrolled step's, docs/benchmarks.md). Another size (a short last
  batch) builds the loops once more, for any size (`variants`).
- Activations and gradients cross stages through one FIFO queue per (tensor, consumer stage),
  made once on the sender's device, where the reads run too (so a reading loop sends its
  condition there at each iteration; a read was once a non-inlined function call on that
  device, which cost a call per read, docs/benchmarks.md).
  `program.loop_refusal` checks that each queue's reader reads in its writer's order.
- TensorFlow behaviours this is built around (each one hung, or silently skipped work, in
  the probe this module grew from): automatic control dependencies order every op touching
  one queue, so the loops are traced without them (`_keras.functions.graph_function`);
  Grappler drops a function call's unread outputs with their side effects, so every rank's
  action count is returned and checked; a control dependency onto a constant is dropped, so
  each action waits on an Identity of the loop counter; an operation no loop output depends
  on is never run, so each action's end waits on every value it dequeued (a stage whose
  gradient for an output is structurally zero left that gradient queued, and the next step
  hung) and the queues are checked empty after each step; each action's end waits on its
  stage function's call operation, so state updates inside it (BatchNormalization's moving
  statistics, seed generators) finish before the next action starts.
- Metrics are updated once after the loops, on the last stage's device, from the
  micro-batches' predictions concatenated in batch order (the compiled metrics are sums over
  samples, so this equals updating them per micro-batch).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from tfpipe._keras import functions, has_compiled_metrics
from tfpipe.devices import HOST
from tfpipe.executor.forward import StageRunner, graph_outputs
from tfpipe.executor.grads import combine_listed
from tfpipe.executor.microbatch import Shares
from tfpipe.executor.program import RankRows, loop_refusal
from tfpipe.executor.residuals import ListStore, RingStore, store_for
from tfpipe.executor.stagepair import (
    Queue,
    StagePair,
    add_weight_grads,
    check_input_gradient,
    edges,
    forward_args,
    got_op,
    initial_state,
    micro_size,
    micro_spec,
    moved_lists,
    relaxed,
    set_item,
    shape_of,
    split_list,
    stage_input_ids,
)
from tfpipe.executor.steady import steady_phase
from tfpipe.partition import Stage
from tfpipe.schedules import Schedule

__all__ = ["RankLoops", "edges", "loops_refusal"]


def loops_refusal(runner: StageRunner, stages: list[Stage], schedule: Schedule,
                  features: dict[str, bool], steady: bool = False) -> str | None:
    """Why the rank loops (or with `steady`, the steady loop, `tfpipe.executor.steadyloop`)
    cannot run a training step of `stages` (the executor's `runner`) with `schedule` yet, or
    None; `features`: each feature asked for (by the name the reason gives), and whether it
    is on."""
    used = [name for name, on in features.items() if on]
    gpus = [st.index for st in stages if tf.DeviceSpec.from_string(st.device).device_type == "GPU"]
    if gpus and not steady:  # queues have CPU kernels only: activations would cross the host
        used.insert(0, f"stages on GPUs (stages {gpus}: their queues would be in host memory)")
    if runner.opaque:
        used.insert(0, "a subclassed model trained whole")
    elif len(runner.output_ids) > 1:  # Keras's per-output loss metrics read static batch sizes
        used.insert(0, "a model with several outputs")
    if used:
        return f"the {'steady loop' if steady else 'rank loops'} do not run {', '.join(used)} yet"
    if steady:
        return None if steady_phase(schedule, edges(runner, stages)) else (
            f"{schedule.name} has no steady phase one loop can carry (tfpipe.executor.steady)")
    return loop_refusal(schedule, edges(runner, stages))


class RankLoops:
    """The training step of a schedule as one in-graph loop per rank.

    Args:
        runner: the executor's `StageRunner`.
        stages: the model's stages (a graph model's), one copy, stage k on `stages[k].device`.
        schedule: a schedule the loops can run (`program.loop_refusal` is None).

    Attributes:
        region: the concrete function holding every rank's loop (built at the first trace).
        pairs: each stage's `StagePair`.
        micro: the micro-batch size the stage functions were traced for, None for any.
        variants: the loops built for other micro-batch sizes (`micro_size`).
    """

    def __init__(self, runner: StageRunner, stages: list[Stage], schedule: Schedule) -> None:
        self.runner, self.stages, self.schedule = runner, stages, schedule
        self.rows = RankRows.build(schedule)
        self.micro: int | None = None
        self.variants: dict[int | None, RankLoops] = {}
        self.m = schedule.num_micro_batches
        self.pairs: list[StagePair] = []
        self.stores: dict[int, RingStore | ListStore] = {}
        self.region: Any = None
        self.layout: Any = None
        self.acts: dict[tuple[int, int], Queue] = {}
        self.grads: dict[tuple[int, int], Queue] = {}
        self.consumers: dict[int, list[int]] = {}

    def __call__(self, shares: Shares, inputs: list[Any], y: Any, sw: Any, x: Any
                 ) -> tuple[list[tf.Tensor], list[list[Any]]]:
        """Runs every rank's row on the batch.

        Args:
            shares: the micro-batches' sizes and loss weights (`microbatch.Shares`).
            inputs: the model's flat inputs, whole batch, on the host.
            y, sw: the batch's labels and sample weights (structures).
            x: the batch's inputs as given (for `compute_metrics`).

        Returns:
            The weighted loss terms (one per rank), and per stage the gradients of its
            trainable variables (a tensor, IndexedSlices or None), for `apply_gradients`.
        """
        ys = keras.tree.flatten(y)
        sws = [] if sw is None else keras.tree.flatten(sw)
        micro = micro_size([*inputs, *ys, *sws], self.m)
        if self.region is not None and micro != self.micro:  # a short last batch, say
            if micro not in self.variants:
                self.variants[micro] = type(self)(self.runner, self.stages, self.schedule)
            return self.variants[micro](shares, inputs, y, sw, x)
        if self.region is None:
            self.micro = micro
            with tf.init_scope():
                self._build(inputs, y, sw, ys, sws)
        with tf.device(HOST):  # where the batch arrives (`devices.HOST`)
            args = [split_list(t, shares.sizes) for t in [*inputs, *ys, *sws]]
            args += [shares.data_scale, shares.extra_scale]
        got = tf.nest.pack_sequence_as(self.layout, functions.call_graph_function(self.region,
                                                                                 args))
        ran = tf.debugging.assert_equal(
            tf.stack(got["ticks"]), tf.constant([len(r) for r in self.rows.codes]),
            message="tfpipe rank loops: a rank did not run its whole schedule row")
        with tf.control_dependencies([ran]):  # every value sent was read
            left = [(key, q.queue.size()) for key, q in [*self.acts.items(), *self.grads.items()]]
            emptied = tf.debugging.assert_equal(
                tf.stack([n for _, n in left]), tf.zeros([len(left)], tf.int32),
                message="tfpipe rank loops: values left in the queues (tensor id, consumer "
                f"stage) {[key for key, _ in left]} after a step") if left else tf.no_op()
        with tf.control_dependencies([ran, emptied]):
            losses = [tf.identity(t) for t in got["loss"]]
        grads: list[list[Any]] = [[None] * len(st.trainable_variables) for st in self.stages]
        for key, g in got["grads"].items():
            s, k = (int(p) for p in key.split("/"))
            if isinstance(g, list):  # IndexedSlices, concatenated over micro-batches
                var = self.stages[s].trainable_variables[k]
                with tf.device(self.stages[s].device):
                    values, indices, lengths = g
                    g = combine_listed(values, indices, lengths,
                                       tf.constant(list(var.shape), tf.int64))
            grads[s][k] = g
        if got["preds"]:
            with tf.device(self.stages[-1].device):
                y_pred = keras.tree.pack_sequence_as(self.runner.output_struct, got["preds"])
                self.runner.model.compute_metrics(x, y, y_pred, sw)
        return losses, grads

    def operation_count(self) -> int:
        """Operations in the loops' own graph (loop and branch bodies not counted)."""
        return functions.operation_count(self.region) if self.region is not None else 0

    def _build(self, inputs: list[Any], y: Any, sw: Any, ys: list[Any], sws: list[Any]) -> None:
        spec_of = self._make_pairs(inputs, y, sw, ys, sws)
        for pair in self.pairs:
            s = pair.stage.index
            self.stores[s] = store_for(pair, self.rows.depth.get(s, 1), self.rows.width.get(s, 1))
        producer = {id(t): st.index for st in self.stages for t in graph_outputs(st)}
        for pair in self.pairs:
            c = pair.stage.index
            for i in pair.in_ids:
                if i in producer:
                    self.consumers.setdefault(i, []).append(c)
                    self.acts[(i, c)] = Queue(self.stages[producer[i]].device, spec_of[i], self.m)
                    if spec_of[i].dtype.is_floating:
                        check_input_gradient(pair, i, producer[i], "rank loops")
                        self.grads[(i, c)] = Queue(pair.stage.device, spec_of[i], self.m)
        self._make_region(len(inputs), len(ys), len(sws))

    def _make_pairs(self, inputs: list[Any], y: Any, sw: Any, ys: list[Any], sws: list[Any]
                    ) -> dict[int, Any]:
        """Builds each stage's `StagePair`; returns each graph tensor's micro-batch spec."""
        runner = self.runner
        spec_of = {i: micro_spec(t, self.micro) for i, t in zip(runner.input_ids, inputs)}
        metrics = has_compiled_metrics(runner.model)
        for st in self.stages:
            labels = None
            if st.index == runner.last:
                labels = (y, sw, *([micro_spec(t, self.micro) for t in ts] for ts in (ys, sws)))
            ids = stage_input_ids(runner, st)
            pair = StagePair(runner, st, [spec_of[i] for i in ids], labels, metrics, self.pairs)
            self.pairs.append(pair)
            for i, n in pair.out_at.items():
                spec_of[i] = pair.specs[n]
        return spec_of

    def _make_region(self, nx: int, ny: int, nsw: int) -> None:
        """Traces `_region` (every rank's loop) for nx inputs, ny labels, nsw sample weights."""
        signature = [tf.TensorSpec([], tf.variant)] * (nx + ny + nsw)
        signature += [tf.TensorSpec([self.m], tf.float32)] * 2
        self._counts = (nx, ny, nsw)
        self.region = functions.graph_function(f"tfpipe_{type(self).__name__}", self._region,
                                               signature)

    def _region(self, *args: Any) -> list[Any]:
        """Every rank's loop; returns their flat results (`self.layout` gives the structure)."""
        nx, ny, nsw = self._counts
        lists = {"x": dict(zip(self.runner.input_ids, args[:nx])),
                 "labels": list(args[nx: nx + ny + nsw]),
                 "data_scale": args[-2], "extra_scale": args[-1]}
        out: dict[str, Any] = {"loss": [], "ticks": [], "grads": {}, "preds": []}
        for r, branches in enumerate(self.rows.branches):
            final = self._rank_loop(r, branches, lists)
            out["loss"].append(final["loss"])
            out["ticks"].append(final["tick"])
            with tf.device(self.stages[branches[0][0]].device):  # the rank's sums stay there
                self._collect(branches, final, out)
        self.layout = out
        flat: list[Any] = tf.nest.flatten(out)
        return flat

    def _collect(self, branches: list[tuple[int, str]], final: dict[str, Any],
                 out: dict[str, Any]) -> None:
        """Adds a rank's weight gradients (by variable) and predictions to `out`."""
        shape = functools.cache(lambda dims: tf.constant(dims, tf.int32))  # one per shape
        for pos, (s, pair) in enumerate(self._rank_pairs(branches)):
            for group, summed in zip(pair.dense_groups(), final["sums"][pos]):
                variables = [pair.stage.trainable_variables[k] for k in group]
                parts = tf.split(summed, [v.shape.num_elements() for v in variables])
                for k, v, part in zip(group, variables, parts):
                    out["grads"][f"{s}/{k}"] = tf.reshape(part, shape(tuple(v.shape)))
            for (k, g), kept in zip(pair.sparse(), final["slices"][pos]):
                (values, lengths), (indices, _) = (
                    tf.raw_ops.TensorListConcatV2(
                        input_handle=lst, element_shape=shape_of(relaxed(part)),
                        leading_dims=tf.zeros([0], tf.int64), element_dtype=part.dtype)
                    for lst, part in zip(kept, (g.values, g.indices)))
                out["grads"][f"{s}/{k}"] = [values, indices, lengths]
        for lst, spec in zip(final["preds"], self._pred_specs(branches)):
            out["preds"].append(tf.raw_ops.TensorListConcatV2(
                input_handle=lst, element_shape=shape_of(spec),
                leading_dims=tf.zeros([0], tf.int64), element_dtype=spec.dtype)[0])

    def _rank_pairs(self, branches: list[tuple[int, str]]) -> list[tuple[int, StagePair]]:
        """The stages a rank runs, in order of first appearance, with their pairs."""
        seen = list(dict.fromkeys(s for s, _ in branches))
        return [(s, self.pairs[s]) for s in seen]

    def _pred_specs(self, branches: list[tuple[int, str]]) -> list[Any]:
        last = self.pairs[-1]
        if last.stage.index not in {s for s, _ in branches}:
            return []
        return last.specs[last.preds_at: last.preds_at + last.layout["preds"]]

    def _rank_loop(self, r: int, branches: list[tuple[int, str]], lists: dict[str, Any]
                   ) -> dict[str, Any]:
        """Rank r's row as a `tf.while_loop` on its device; returns the final loop state."""
        pairs = self._rank_pairs(branches)
        pos_of = {s: n for n, (s, _) in enumerate(pairs)}
        device = self.stages[pairs[0][0]].device
        rows = self.rows
        tables = (rows.codes[r], rows.micro_batches[r], rows.slots[r], rows.ages[r])
        with tf.device(device):
            init = {**initial_state([p for _, p in pairs], self.m, self._pred_specs(branches)),
                    "res": [self.stores[s].initial() for s, _ in pairs]}
            code_table, mb_table, slot_table, age_table = (tf.constant(t) for t in tables)
            lists = moved_lists([p for _, p in pairs], lists)

            def body(n: Any, state: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
                at = _At(mb_table[n], slot_table[n], age_table[n])
                fns = [self._branch(pairs[pos_of[s]][1], kind, pos_of[s], state, at, lists)
                       for s, kind in branches]
                return n + 1, tf.switch_case(code_table[n], fns)

            _, final = tf.while_loop(lambda n, _: n < len(tables[0]), body, (tf.constant(0), init),
                                     parallel_iterations=1)
        return dict(final)

    def _branch(self, pair: StagePair, kind: str, pos: int, state: dict[str, Any],
                at: _At, lists: dict[str, Any]) -> Any:
        """The loop body's branch for one `(stage, kind)`: a function of no arguments."""
        if kind == "F":
            return lambda: self._forward(pair, pos, state, at, lists)
        return lambda: self._backward(pair, pos, state, at)

    @staticmethod
    def _done(state: dict[str, Any], after: list[Any]) -> dict[str, Any]:
        """`state` with the counter advanced once everything in `after` has run."""
        with tf.control_dependencies(after):
            tick = tf.identity(state["tick"])  # an Identity: Grappler keeps its dependencies
        return {**state, "tick": tick + 1}

    def _forward(self, pair: StagePair, pos: int, state: dict[str, Any], at: _At,
                 lists: dict[str, Any]) -> dict[str, Any]:
        s, mb = pair.stage.index, at.micro_batch
        with tf.control_dependencies([state["tick"]]):
            ins = forward_args(pair, lists, mb, lambda _, i: self.acts[(i, s)].take())
        outs = functions.call_forward(pair.fw, ins + list(pair.function.captured_inputs))
        sent = [self.acts[(i, c)].put(outs[n]) for i, n in pair.out_at.items()
                for c in self.consumers.get(i, [])]
        res = self.stores[s].write(state["res"][pos], at, outs)
        new = {**state, "res": [*state["res"][:pos], res, *state["res"][pos + 1:]]}
        if pair.loss_at is not None:
            new["loss"] = state["loss"] + outs[pair.loss_at]
        if state["preds"] and pair.last:
            new["preds"] = [set_item(lst, mb, outs[pair.preds_at + j])
                            for j, lst in enumerate(state["preds"])]
        # every input read counts: a dequeue nothing reads would not run, and its queue fill
        return self._done(new, [*ins, *sent, *res, new["loss"], *new["preds"], outs[0].op])

    def _backward(self, pair: StagePair, pos: int, state: dict[str, Any], at: _At
                  ) -> dict[str, Any]:
        s, mb = pair.stage.index, at.micro_batch
        if not pair.seeded:  # nothing it made can carry a gradient: no backward to run
            return self._done(state, [])
        floats = [i for i, n in sorted(pair.out_at.items(), key=lambda t: t[1])
                  if n < pair.seeded]
        with tf.control_dependencies([state["tick"]]):
            seeds = [tf.add_n([self.grads[(i, c)].take() for c in self.consumers[i]])
                     for i in floats]
            if pair.loss_at is not None:
                seeds.append(tf.ones([], pair.specs[pair.seeded - 1].dtype))
        res = self.stores[s].read(state["res"][pos], at)
        res.update({n: tf.constant(v, pair.specs[n].dtype) for n, v in pair.constants.items()})
        caps = [c if n is None else res[n] for n, c in pair.bw_caps]
        got = functions.call_backward(pair.bw, seeds, caps)
        sent = [self.grads[(i, s)].put(got[j]) for j, i in enumerate(pair.in_ids)
                if (i, s) in self.grads]
        new = add_weight_grads(pair, state, pos, got, mb)
        after = [*seeds, *sent, *new["sums"][pos], *tf.nest.flatten(new["slices"][pos]),
                 got_op(got)]
        return self._done(new, after)


class _At(NamedTuple):
    """An action's micro-batch, and where its residuals wait (`RankRows.slots`, `.ages`)."""
    micro_batch: tf.Tensor
    slot: tf.Tensor
    age: tf.Tensor
