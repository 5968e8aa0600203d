"""The steady loop: a training step with its steady phase traced once, as one in-graph loop.

Design:
- Why: the unrolled step traces each of its M x K actions, and TensorFlow builds each
  called function's body once per call operation before the first run, so its first step
  grows with M x K (8x `model.fit`'s at K = 8, M = 64, docs/benchmarks.md); the rank loops
  (`tfpipe.executor.rankloop`) trace one loop per rank but pass every value through a
  FIFO queue (CPU kernels only) and run one action per iteration. Here the schedule is
  cut (`tfpipe.executor.steady`) into one iteration of its steady phase on every rank,
  traced once as the body of a `tf.while_loop` spanning all devices. The warm-up and
  cool-down are the same body's iterations before and after it with some actions missing
  (`Steady.edges_as_iterations`: 1F1B), so they are two more loops over the same body, each
  action that exists in only some of their iterations in a `tf.cond` on its micro-batch
  existing (conditions in the steady loop itself cost 13 % on one-thread workers,
  docs/benchmarks.md). Values pass between stages as plain tensors (`Send`/`Recv` where
  devices differ), on any device type.
- It runs the rank loops' stage functions (`StagePair`: forward with residuals, backward
  from them) and keeps their state per rank (`stagepair.initial_state`): the loss, the
  dense gradient sums, the IndexedSlices and predictions per micro-batch in TensorLists,
  and a per-rank counter that each action waits on and advances, which keeps every rank's
  actions in its row's order.
- A value made in iteration i and read in iteration i + d (`Steady.delay`: an activation
  one stage on in 1F1B, a stage's residuals K - s iterations later) is carried as one of
  the loop's last d values of its stream; inside the body the values are keyed by the
  micro-batch they have in iteration 0, so the body is traced by the same handlers as the
  actions around the loop.
- Each loop's counter and condition run on the first stage's device: a loop spanning
  devices sends its condition to every device each iteration, and from the host that was a
  message from the client to every worker per iteration (`tests/test_steady_loop.py`).
- The step is traced without automatic control dependencies (`_keras.functions.
  graph_function`): with them, every stateful operation in a loop body (each function call
  is one) becomes a control output of the iteration, and the next iteration waits for all
  of them: two devices then take turns instead of overlapping (a probe on 2 logical CPU
  devices: 20.5 ms per iteration against 10.7 ms unrolled, 10.7 ms without them,
  docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfpipe._keras import functions
from tfpipe.executor.forward import StageRunner, graph_outputs
from tfpipe.executor.program import trace_order
from tfpipe.executor.rankloop import RankLoops
from tfpipe.executor.residuals import unpacked
from tfpipe.executor.stagepair import (
    StagePair,
    add_weight_grads,
    check_input_gradient,
    edges,
    forward_args,
    got_op,
    initial_state,
    moved_lists,
    relaxed,
    set_item,
)
from tfpipe.executor.steady import Steady, steady_phase
from tfpipe.partition import Stage
from tfpipe.schedules import Action, Schedule

__all__ = ["SteadyLoop"]

Key = tuple[Any, ...]
"""A stream: `("act", tensor id, consumer stage)`, `("grad", tensor id, consumer stage)` or
`("res", stage)`; with a micro-batch, one value of it."""


class SteadyLoop(RankLoops):
    """The training step of a schedule with its steady phase as one in-graph loop.

    Args:
        runner: the executor's `StageRunner`.
        stages: the model's stages, stage k on `stages[k].device`.
        schedule: a schedule with a steady phase (`loops_refusal(..., steady=True)` is None).
    """

    def __init__(self, runner: StageRunner, stages: list[Stage], schedule: Schedule) -> None:
        super().__init__(runner, stages, schedule)
        cut = steady_phase(schedule, edges(runner, stages))
        assert cut is not None, "loops_refusal(steady=True) found a steady phase"
        self.cut: Steady = cut
        self.rank_of = {a: r for r, row in enumerate(schedule.ranks) for a in row}
        self.order = {a: n for n, a in enumerate(trace_order(schedule))}

    def _build(self, inputs: list[Any], y: Any, sw: Any, ys: list[Any], sws: list[Any]) -> None:
        spec_of = self._make_pairs(inputs, y, sw, ys, sws)
        producer = {id(t): st.index for st in self.stages for t in graph_outputs(st)}
        streams: list[tuple[Key, tuple[int, str], tuple[int, str], Any]] = []
        for pair in self.pairs:
            c = pair.stage.index
            if pair.residuals:
                streams.append((("res", c), (c, "F"), (c, "B"), None))
            for i in pair.in_ids:
                if i in producer:
                    p = producer[i]
                    self.consumers.setdefault(i, []).append(c)
                    streams.append((("act", i, c), (p, "F"), (c, "F"), spec_of[i]))
                    if spec_of[i].dtype.is_floating:
                        check_input_gradient(pair, i, p, "steady loop")
                        streams.append((("grad", i, c), (c, "B"), (p, "B"), spec_of[i]))
        self.sends = {key[1:] for key, _, _, _ in streams if key[0] == "grad"}
        # the streams the loop carries: (stream, its producer's micro-batch in iteration 0,
        # iterations from making a value to reading it, its spec: None for residuals)
        self.carried = [(key, self.cut.template[p], self.cut.delay(p, c), spec)
                        for key, p, c, spec in streams if self.cut.delay(p, c) > 0]
        self.made_on = {key: self.stages[p[0]].device for key, p, _, _ in streams}
        self._make_region(len(inputs), len(ys), len(sws))

    def _region(self, *args: Any) -> list[Any]:
        nx, ny, nsw = self._counts
        lists = {"x": dict(zip(self.runner.input_ids, args[:nx])),
                 "labels": list(args[nx: nx + ny + nsw]),
                 "data_scale": args[-2], "extra_scale": args[-1]}
        ranks = range(len(self.schedule.ranks))
        pairs = [self._rank_pairs(self.rows.branches[r]) for r in ranks]
        moved, states = [], []
        for r in ranks:
            with tf.device(self.stages[pairs[r][0][0]].device):
                moved.append(moved_lists([p for _, p in pairs[r]], lists))
                states.append(initial_state([p for _, p in pairs[r]], self.m,
                                            self._pred_specs(self.rows.branches[r])))
        cut, edges = self.cut, self.cut.edges_as_iterations()
        assert edges is not None, "steady_phase cuts only where the edges are iterations"
        lead, tail = edges
        lines = [[self._placeholder(key, spec) for _ in range(d)]
                 for key, _, d, spec in self.carried]
        # the warm-up and cool-down: the body's iterations before and after, masked
        for first, last, masked in ((-lead, 0, True), (0, cut.count, False),
                                    (cut.count, cut.count + tail, True)):
            states, lines = self._loop(states, lines, moved, first, last, masked)
        out: dict[str, Any] = {"loss": [], "ticks": [], "grads": {}, "preds": []}
        for r in ranks:
            out["loss"].append(states[r]["loss"])
            out["ticks"].append(states[r]["tick"])
            with tf.device(self.stages[pairs[r][0][0]].device):
                self._collect(self.rows.branches[r], states[r], out)
        self.layout = out
        flat: list[Any] = tf.nest.flatten(out)
        return flat

    def _placeholder(self, key: Key, spec: Any) -> tf.Tensor:
        """A stand-in for a stream's value that no action reads (an iteration before its
        first value or a masked action's): no rows, or an empty `Optional`."""
        with tf.device(self.made_on[key]):
            return _nothing(key, spec)

    def _loop(self, states: list[dict[str, Any]], lines: list[list[Any]],
              moved: list[dict[str, Any]], first: int, last: int, masked: bool = False
              ) -> tuple[list[dict[str, Any]], list[list[Any]]]:
        """Iterations `first` to `last - 1` of the body as one `tf.while_loop` (`masked`:
        each action only where its micro-batch exists); returns the states and lines."""
        if last <= first:
            return states, lines
        carried = self.carried

        def body(i: Any, states: list[Any], lines: list[Any]) -> tuple[Any, list[Any], list[Any]]:
            vals = {(*key, p0 - d + j): v for (key, p0, d, _), line in zip(carried, lines)
                    for j, v in enumerate(line)}
            states = [dict(s) for s in states]
            self._run(self.cut.body, states, moved, vals, i, (first, last) if masked else None)
            # a value an action not traced here would have made: a stand-in no action reads
            return i + 1, states, [[vals[k] if (k := (*key, p0 - d + 1 + j)) in vals else
                                    self._placeholder(key, spec) for j in range(d)]
                                   for key, p0, d, spec in carried]

        shapes = (tf.TensorShape([]), [tf.nest.map_structure(lambda t: t.shape, st)
                                       for st in states],
                  [[tf.TensorShape([]) if spec is None else relaxed(spec).shape] * d
                   for _, _, d, spec in carried])
        # the counter and its condition on the first stage's device: on the host, every
        # iteration sent the condition and the counter from the host to every device
        with tf.device(self.stages[0].device):
            _, states, lines = tf.while_loop(
                lambda i, *_: i < last, body, (tf.constant(first), states, lines),
                shape_invariants=shapes, parallel_iterations=len(self.schedule.ranks) + 1)
        return states, lines

    def _run(self, rows: list[list[Action]], states: list[dict[str, Any]],
             moved: list[dict[str, Any]], values: dict[Key, Any], offset: Any,
             masked: tuple[int, int] | None = None) -> None:
        """Traces `rows`' actions in trace order; `offset`: added to each micro-batch to index
        the batch (the loop counter); `masked`: the loop's first and last iteration, where an
        action whose micro-batch exists in some of them but not all runs in a `tf.cond` on it
        existing (one that exists in none is not traced)."""
        m = self.m
        for a in sorted((a for row in rows for a in row), key=self.order.__getitem__):
            r = self.rank_of[a]
            pos = [s for s, _ in self._rank_pairs(self.rows.branches[r])].index(a.stage)
            pair = self.pairs[a.stage]
            step = self._forward_at if a.kind == "F" else self._backward_at
            lo, hi = (a.micro_batch + masked[0], a.micro_batch + masked[1] - 1) if masked else (
                0, 0)
            if hi < 0 or lo >= m:  # in none of the loop's iterations
                continue
            with tf.device(pair.stage.device):
                if lo >= 0 and hi < m:  # in all of them
                    states[r] = step(pair, pos, states[r], a.micro_batch, offset, values,
                                     moved[r])
                    continue
                real = a.micro_batch + offset
                exists = tf.logical_and(real >= 0, real < self.m)
                states[r] = self._masked(exists, step, pair, pos, states[r], a.micro_batch,
                                         offset, values, moved[r])

    def _masked(self, exists: Any, step: Any, pair: StagePair, pos: int, state: dict[str, Any],
                mb: int, offset: Any, values: dict[Key, Any], lists: dict[str, Any]
                ) -> dict[str, Any]:
        """`step` in a `tf.cond` on `exists`: otherwise the state is kept and the values it
        would make are placeholders (no action reads them)."""
        made: dict[str, Any] = {}

        def run() -> tuple[dict[str, Any], list[Any]]:  # traced first (`tf.cond`)
            local = dict(values)
            new = step(pair, pos, state, mb, offset, local, lists)
            made["keys"] = [k for k in local if k not in values]
            made["read"] = [k for k in values if k not in local]
            made["values"] = [local[k] for k in made["keys"]]
            return new, made["values"]

        def skip() -> tuple[dict[str, Any], list[Any]]:
            return state, [_nothing(k, v) for k, v in zip(made["keys"], made["values"])]

        new, outs = tf.cond(exists, run, skip)
        for k in made["read"]:
            values.pop(k)
        values.update(zip(made["keys"], outs))
        return dict(new)

    def _forward_at(self, pair: StagePair, pos: int, state: dict[str, Any], mb: int,
                    offset: Any, values: dict[Key, Any], lists: dict[str, Any]
                    ) -> dict[str, Any]:
        s, real = pair.stage.index, mb + offset
        specs = pair.function.structured_input_signature[0]
        with tf.control_dependencies([state["tick"]]):
            ins = forward_args(pair, lists, real, lambda j, i: _shaped(
                values.pop(("act", i, s, mb)), specs[j]))
        outs = functions.call_forward(pair.fw, ins + list(pair.function.captured_inputs))
        for i, n in pair.out_at.items():
            for c in self.consumers.get(i, []):
                values[("act", i, c, mb)] = outs[n]
        if pair.residuals:  # one value per micro-batch, however many residuals (`RingStore`)
            values[("res", s, mb)] = tf.raw_ops.OptionalFromValue(
                components=[outs[n] for n in pair.residuals])
        new = dict(state)
        if pair.loss_at is not None:
            new["loss"] = state["loss"] + outs[pair.loss_at]
        if state["preds"] and pair.last:
            new["preds"] = [set_item(lst, real, outs[pair.preds_at + j])
                            for j, lst in enumerate(state["preds"])]
        return self._done(new, [*ins, new["loss"], *new["preds"], outs[0].op])

    def _backward_at(self, pair: StagePair, pos: int, state: dict[str, Any], mb: int,
                     offset: Any, values: dict[Key, Any], lists: dict[str, Any]
                     ) -> dict[str, Any]:
        s = pair.stage.index
        res = unpacked(pair, values.pop(("res", s, mb))) if pair.residuals else {}
        floats = [i for i, n in sorted(pair.out_at.items(), key=lambda t: t[1])
                  if n < pair.seeded]
        if not pair.seeded:
            return self._done(state, [])
        with tf.control_dependencies([state["tick"]]):
            seeds = [_shaped(tf.add_n([values.pop(("grad", i, c, mb))
                                       for c in self.consumers[i]]), pair.specs[pair.out_at[i]])
                     for i in floats]
            if pair.loss_at is not None:
                seeds.append(tf.ones([], pair.specs[pair.seeded - 1].dtype))
        res.update({n: tf.constant(v, pair.specs[n].dtype) for n, v in pair.constants.items()})
        caps = [c if n is None else res[n] for n, c in pair.bw_caps]
        got = functions.call_backward(pair.bw, seeds, caps)
        return self._sum(pair, pos, state, got, mb + offset, values, mb, seeds)

    def _sum(self, pair: StagePair, pos: int, state: dict[str, Any], got: list[Any],
             real: Any, values: dict[Key, Any], mb: int, seeds: list[Any]) -> dict[str, Any]:
        """Passes a backward's input gradients on and adds its weight gradients."""
        s = pair.stage.index
        sent = []
        for j, i in enumerate(pair.in_ids):
            if (i, s) in self.sends:
                values[("grad", i, s, mb)] = got[j]
                sent.append(got[j])
        new = add_weight_grads(pair, state, pos, got, real)
        return self._done(new, [*seeds, *sent, *new["sums"][pos],
                                *tf.nest.flatten(new["slices"][pos]), got_op(got)])


def _nothing(key: Key, like: Any) -> tf.Tensor:
    """A stand-in for a value of stream `key` shaped like `like` (a spec or tensor) that no
    action reads: an empty `Optional` for residuals, else no rows."""
    if key[0] == "res":
        return tf.raw_ops.OptionalNone()
    dims = [0 if d is None else d for d in like.shape]
    return tf.zeros(dims[:1] and [0, *dims[1:]], like.dtype)


def _shaped(value: tf.Tensor, spec: Any) -> tf.Tensor:
    """`value` (a loop variable of any batch size) with `spec`'s static shape, as the stage
    function it goes to was traced for."""
    got = tf.identity(value)
    got.set_shape(spec.shape)
    return got
