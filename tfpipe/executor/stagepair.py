"""The loops' stage functions (forward and backward), queues, and TensorList helpers.

Design: see `tfpipe.executor.rankloop` and `tfpipe.executor.steadyloop`, which both call
these. A stage's forward is traced once as a `tf.function`
of its inputs (on the last stage also the micro-batch's labels, sample weights and loss
weight, and on every stage its share of the regularisation losses) and returns, in this
order, the values its backward seeds (float outputs sent to later stages, then the scaled
loss), then the rest (non-float outputs, the unscaled loss, the predictions for the
metrics). TensorFlow's forward/backward pair for a call of it (`_keras.functions`) then
gives the forward with its residuals appended and the backward from output gradients and
residuals to input and weight gradients (None for a weight the stage does not use, IndexedSlices
for a gathered table). With `jit_compile`, the forward is built with XLA on (when XLA can
lower it: `StageFunctions.xla_for`), and TensorFlow marks both functions `_XlaMustCompile`,
so each compiles on the device of the stage that calls it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

from tfpipe._keras import compiled_loss, functions
from tfpipe.errors import PipelineError
from tfpipe.executor.forward import StageRunner, graph_inputs, graph_outputs
from tfpipe.executor.grads import OWN_SUM
from tfpipe.executor.stagefn import without_data_gradients
from tfpipe.partition import Stage
from tfpipe.partition.stages import check_gradient_path

__all__ = ["StagePair", "Queue", "add_weight_grads", "check_input_gradient", "edges",
           "forward_args", "initial_state", "moved_lists", "stage_input_ids"]


def relaxed(t: Any) -> tf.TensorSpec:
    """A spec of `t` with its batch dimension unknown (micro-batches may differ by one)."""
    shape = t.shape
    if shape.rank:
        shape = tf.TensorShape([None, *shape[1:]])
    return tf.TensorSpec(shape, t.dtype)


def micro_size(tensors: list[Any], m: int) -> int | None:
    """The micro-batch size to trace the stage functions for: the batch's static size B / M
    when every tensor has that B and M divides it (equal micro-batches), else None (any
    size: a short last batch, or a batch whose size is not known when tracing)."""
    sizes = {t.shape[0] for t in tensors if t.shape.rank}
    batch = sizes.pop() if len(sizes) == 1 else None
    return batch // m if batch is not None and batch % m == 0 else None


def micro_spec(t: Any, micro: int | None) -> tf.TensorSpec:
    """A spec of one micro-batch of `t`: `micro` rows, or any (`relaxed`) for None."""
    if micro is None or not t.shape.rank:
        return relaxed(t)
    return tf.TensorSpec([micro, *t.shape[1:]], t.dtype)


def fresh_zeros(n: int, dtype: tf.DType) -> tf.Tensor:
    """n zeros made at each step. `tf.zeros` is folded into a constant that the runtime holds
    for good: the gradient sums' initial values held the weights' size again (16 MiB after a
    fit of 16 MiB of weights, `tests/test_build_scope.py`); `Empty` is never folded."""
    return tf.raw_ops.Empty(shape=[n], dtype=dtype, init=True)


def shape_of(spec: Any) -> tf.Tensor:
    """An element shape for TensorList ops (-1 for an unknown dimension or rank)."""
    if spec.shape.rank is None:
        return tf.constant(-1)
    return tf.constant([-1 if d is None else d for d in spec.shape], tf.int32)


def reserve(spec: Any, n: int) -> tf.Tensor:
    return tf.raw_ops.TensorListReserve(element_shape=shape_of(spec), num_elements=n,
                                        element_dtype=spec.dtype)


def get(lst: tf.Tensor, index: tf.Tensor, spec: Any, shape: Any = None) -> tf.Tensor:
    """Element `index` of `lst`, with `spec`'s static shape (`shape`: the element shape the
    op is told, by default any)."""
    got = tf.raw_ops.TensorListGetItem(
        input_handle=lst, index=index, element_shape=tf.constant(-1) if shape is None else shape,
        element_dtype=spec.dtype)
    got.set_shape(spec.shape)
    return got


def set_item(lst: tf.Tensor, index: tf.Tensor, value: tf.Tensor) -> tf.Tensor:
    return tf.raw_ops.TensorListSetItem(input_handle=lst, index=index, item=value)


def split_list(t: tf.Tensor, sizes: tf.Tensor) -> tf.Tensor:
    """A TensorList of `t`'s micro-batches (`sizes` rows each)."""
    return tf.raw_ops.TensorListSplit(tensor=t, element_shape=shape_of(relaxed(t)),
                                      lengths=tf.cast(sizes, tf.int64))


def got_op(got: list[Any]) -> Any:
    """The call operation behind a backward's outputs (its first tensor's producer)."""
    first = next(g for g in got if g is not None)
    return (first.values if isinstance(first, tf.IndexedSlices) else first).op


def initial_state(pairs: list[StagePair], m: int, pred_specs: list[Any]) -> dict[str, Any]:
    """A rank's loop state before its first action (made on its device): its action counter,
    loss, dense gradient sums (`StagePair.dense_groups`, per stage of the rank) and
    TensorLists of the M micro-batches' IndexedSlices and predictions."""
    return {
        "tick": tf.constant(0), "loss": tf.zeros([]),
        "sums": [[fresh_zeros(sum(p.stage.trainable_variables[k].shape.num_elements()
                             for k in group), p.var_grads[group[0]].dtype)
                  for group in p.dense_groups()] for p in pairs],
        "slices": [[(reserve(relaxed(g.values), m), reserve(relaxed(g.indices), m))
                    for _, g in p.sparse()] for p in pairs],
        "preds": [reserve(spec, m) for spec in pred_specs],
    }


def forward_args(pair: StagePair, lists: dict[str, Any], index: Any,
                 take: Callable[[int, int], Any]) -> list[Any]:
    """The arguments of a stage's forward for micro-batch `index`: its model inputs from the
    batch's lists (`moved_lists`), its other inputs from `take(position, tensor id)`, on the
    last stage the labels, sample weights and loss weight, then its regularisation share."""
    specs = pair.function.structured_input_signature[0]
    ins = [get(lists["x"][i], index, specs[j]) if i in lists["x"] else take(j, i)
           for j, i in enumerate(pair.in_ids)]
    if pair.last:
        ins += [get(lst, index, spec)
                for lst, spec in zip(lists["labels"], specs[len(pair.in_ids):])]
        ins.append(tf.gather(lists["data_scale"], index))
    ins.append(tf.gather(lists["extra_scale"], index))
    return ins


def add_weight_grads(pair: StagePair, state: dict[str, Any], pos: int, got: list[Any],
                     index: Any) -> dict[str, Any]:
    """A rank's loop `state` with a backward's weight gradients (`got`: its outputs) added:
    each dense group's flattened into its sum, the IndexedSlices set at micro-batch `index`
    of their TensorLists (`pos`: the stage's place among the rank's)."""
    of = {k: got[pair.num_args + j] for j, k in enumerate(pair.var_of) if k is not None}
    flat = tf.constant([-1])
    sums = [total + tf.concat([tf.reshape(of[k], flat) for k in group], 0)
            for group, total in zip(pair.dense_groups(), state["sums"][pos])]
    slices = [(set_item(v, index, of[k].values), set_item(i, index, of[k].indices))
              for (k, _), (v, i) in zip(pair.sparse(), state["slices"][pos])]
    return {**state, "sums": [*state["sums"][:pos], sums, *state["sums"][pos + 1:]],
            "slices": [*state["slices"][:pos], slices, *state["slices"][pos + 1:]]}


def check_input_gradient(pair: StagePair, i: int, producer: int, loops: str) -> None:
    """Refuses a stage that gives no gradient for a float input (tensor id `i`) that stage
    `producer` sends it: the `loops` (named in the error) cannot pass one back."""
    if pair.input_grads[pair.in_ids.index(i)] is None:
        raise PipelineError(
            f"tfpipe {loops}: stage {pair.stage.index} ({', '.join(pair.stage.names)}) gives "
            f"no gradient for an input it reads from stage {producer}, so they cannot pass "
            "one back: use rank_loops='auto' (the default, which unrolls such a model) or False.")


def moved_lists(pairs: list[StagePair], lists: dict[str, Any]) -> dict[str, Any]:
    """The batch's lists and loss weights a rank's stages read, moved to its device before
    its loop (in its device scope): read on the host, each iteration on a worker waited on
    the host; passed into the loop, a list crossed at every forward (docs/benchmarks.md)."""
    ids, last = {i for p in pairs for i in p.in_ids}, any(p.last for p in pairs)
    return {"x": {i: tf.identity(t) for i, t in lists["x"].items() if i in ids},
            "labels": [tf.identity(t) for t in lists["labels"]] if last else [],
            "data_scale": tf.identity(lists["data_scale"]),
            "extra_scale": tf.identity(lists["extra_scale"])}


def stage_input_ids(runner: StageRunner, stage: Stage) -> list[int]:
    """Ids of the graph tensors a stage's forward takes (the last also the early outputs)."""
    ids = [id(t) for t in graph_inputs(stage)]
    if stage.index == runner.last:
        ids += [i for i in runner.early_outputs if i not in ids]
    return ids


def edges(runner: StageRunner, stages: list[Stage]) -> list[tuple[int, int]]:
    """`(producer, consumer)` stage pairs of every tensor passed between stages."""
    producer = {id(t): st.index for st in stages for t in graph_outputs(st)}
    model_inputs = set(runner.input_ids)
    return sorted({(producer[i], st.index) for st in stages
                   for i in stage_input_ids(runner, st) if i not in model_inputs})


class StagePair:
    """One stage's forward and backward functions and how their values are laid out.

    Args:
        runner: the executor's `StageRunner` (model inputs, predictions, extra losses, and
            whether to compile with XLA).
        stage: the stage.
        specs: one spec per stage input (`in_ids` order), batch dimension unknown.
        labels: on the last stage, the specs of the flat labels and sample weights.
        metrics: on the last stage, whether to return the predictions for the metrics.
        built: the stages' pairs built so far: one whose forward graph has this one's
            `structure` gives its forward and backward functions (not built again).
    """

    fw: Any
    bw: Any
    structure: tuple[Any, ...]
    self_contained: bool
    jit: bool

    def __init__(self, runner: StageRunner, stage: Stage, specs: list[Any],
                 labels: tuple[Any, Any, list[Any], list[Any]] | None, metrics: bool,
                 built: Sequence[StagePair] = ()) -> None:
        self.stage = stage
        self.last = labels is not None
        self.in_ids = stage_input_ids(runner, stage)
        out_ids = [id(t) for t in graph_outputs(stage)]
        y_specs, sw_specs = labels[2:] if labels else ([], [])
        self.layout: dict[str, Any] = {}
        extra_specs = [*y_specs, *sw_specs, tf.TensorSpec([], tf.float32)] if self.last else []
        forward = self._forward(runner, labels, metrics)
        args = [*specs, *extra_specs, tf.TensorSpec([], tf.float32)]
        self.jit = runner.functions.xla_for(stage, True, lambda xs: (forward(*xs), [], []), args)
        with tf.device(stage.device):
            self.function = tf.function(
                forward, autograph=False, jit_compile=True if self.jit else None,
                experimental_attributes={"_noinline": True},
            ).get_concrete_function(*args)
        self.num_args = len(specs) + len(extra_specs) + 1
        self.seeded: int = self.layout["seeded"]
        # where each stage output is among the forward's outputs: floats, (loss), others
        self.out_at = {out_ids[j]: n for n, j in enumerate(self.layout["floats"])}
        self.out_at.update({out_ids[j]: self.seeded + n
                            for n, j in enumerate(self.layout["others"])})
        if not self.last:
            graph_out = self.function.graph.outputs
            check_gradient_path(stage, runner.stages, [graph_out[self.out_at[i]].dtype
                                                       for i in out_ids])
        outputs = self._pair(built)
        self.specs = [tf.TensorSpec(o.shape, o.dtype) for o in outputs]  # as traced
        pos = {id(t): n for n, t in enumerate(outputs)}
        self.bw_caps = [(pos.get(id(c)), c) for c in self.bw.captured_inputs]
        # whether the backward reads only the forward's outputs (not its captures)
        self.self_contained = all(n is not None for n, _ in self.bw_caps)
        # constants the backward reads (a tenth of the 12-block Transformer's residuals) are
        # made again in the backward's branch, not kept per micro-batch
        self.constants = {n: tf.get_static_value(outputs[n]) for n, _ in self.bw_caps
                          if n is not None and outputs[n].op.type == "Const"}
        self.residuals = sorted({n for n, _ in self.bw_caps
                                 if n is not None and n not in self.constants})
        # the residuals by dtype, for `residuals.ListStore`: one TensorList per group and loop,
        # slot w's residual j of a group of g at index w * g + j (a loop variable per residual
        # made hundreds per rank, and lowering them dominated the first run)
        groups: dict[Any, list[int]] = {}
        for n in self.residuals:
            groups.setdefault(self.specs[n].dtype, []).append(n)
        self.res_groups = list(groups.values())
        handles = {id(v.value.handle): k for k, v in enumerate(stage.trainable_variables)}
        self.var_of = [handles.get(id(c)) for c in self.function.captured_inputs]
        grads = self.bw.graph.structured_outputs
        self.var_grads: dict[int, Any] = {}  # variable index -> its gradient's structure
        for j, k in enumerate(self.var_of):
            if k is not None and grads[self.num_args + j] is not None:
                self.var_grads[k] = grads[self.num_args + j]
        self.input_grads = grads[: len(self.in_ids)]
        if functions.seed_count(self.bw) != self.seeded:
            raise PipelineError(
                f"tfpipe loops: stage {stage.index}'s backward takes "
                f"{functions.seed_count(self.bw)} output gradients, expected {self.seeded}; "
                "use rank_loops='auto' (the default, which unrolls such a model) or False.")

    def _pair(self, built: Sequence[StagePair]) -> list[Any]:
        """Sets `fw` and `bw`: TensorFlow's forward and backward for this stage's function,
        or those of a stage in `built` with the same graph (a repeated block), called with
        this stage's own arguments (building a backward took 0.12-0.25 s a stage of the
        12-block Transformer); returns the forward's outputs, the residuals appended."""
        self.structure = (self.jit, functions.structure(self.function))
        twin = next((p for p in built if p.structure == self.structure and p.self_contained),
                    None)
        if twin is not None:
            self.fw, self.bw = twin.fw, twin.bw
            return list(twin.function.graph.outputs)
        self.fw, self.bw = functions.forward_backward(self.function, self.seeded)
        return list(self.function.graph.outputs)

    def _forward(self, runner: StageRunner, labels: tuple[Any, Any, list[Any], list[Any]] | None,
                 metrics: bool) -> Any:
        """The stage's forward as a Python function of its flat arguments (see the module's
        docstring for the order of its outputs); tracing it fills `self.layout`."""
        stage, model, layout = self.stage, runner.model, self.layout
        y_struct, sw_struct, y_specs, sw_specs = labels or (None, None, [], [])
        ny, nsw = len(y_specs), len(sw_specs)

        def forward(*args: Any) -> list[Any]:
            inputs = without_data_gradients(list(args[: len(self.in_ids)]), self.in_ids,
                                            runner.functions.data_ids)
            rest = args[len(self.in_ids):]
            outs = keras.tree.flatten(stage.model(inputs[: len(stage.inputs or [])],
                                                  training=True))
            terms = []
            if self.last:
                y = keras.tree.pack_sequence_as(y_struct, list(rest[:ny]))
                sw = None if sw_struct is None else keras.tree.pack_sequence_as(
                    sw_struct, list(rest[ny: ny + nsw]))
                y_pred = runner.prediction(stage, outs, dict(zip(self.in_ids, inputs)))
                loss = compiled_loss(model, y, y_pred, sw)
                terms.append(tf.cast(loss * tf.cast(rest[-2], loss.dtype), tf.float32))
            extra = runner.extra_terms(stage, list(stage.model.losses), rest[-1])
            if extra is not None:
                terms.append(extra)
            sent = [] if self.last else outs
            floats = [j for j, o in enumerate(sent) if o.dtype.is_floating]
            others = [j for j, o in enumerate(sent) if not o.dtype.is_floating]
            total = tf.add_n(terms) if terms else None
            seeded = [sent[j] for j in floats] + (
                [model.optimizer.scale_loss(total)] if terms else [])
            preds = keras.tree.flatten(y_pred) if self.last and metrics else []
            layout.update(floats=floats, others=others, seeded=len(seeded), loss=bool(terms),
                          preds=len(preds))
            return seeded + [sent[j] for j in others] + ([total] if terms else []) + preds

        return forward

    def dense(self) -> list[tuple[int, Any]]:
        """`(variable index, gradient)` of the variables differentiated densely."""
        return [(k, g) for k, g in sorted(self.var_grads.items())
                if not isinstance(g, tf.IndexedSlices)]

    def dense_groups(self) -> list[list[int]]:
        """The densely differentiated variables in the groups the rank loops sum, each in one
        flat loop variable: a variable of more than `OWN_SUM` elements alone (concatenated, a
        1024 x 1024 kernel's gradient was copied at every backward: the peer MLP's step, one
        stage, batch 2048, M = 8, one thread, took 1,088 ms against 1,071 ms alone), the
        others by gradient dtype (a loop variable each lowered to thousands of operations for
        the 12-block Transformer's ~180 small variables)."""
        groups: dict[Any, list[int]] = {}
        for k, g in self.dense():
            size = self.stage.trainable_variables[k].shape.num_elements()
            groups.setdefault(k if size > OWN_SUM else g.dtype, []).append(k)
        return list(groups.values())

    def sparse(self) -> list[tuple[int, Any]]:
        """`(variable index, gradient)` of the variables with IndexedSlices gradients."""
        return [(k, g) for k, g in sorted(self.var_grads.items())
                if isinstance(g, tf.IndexedSlices)]

    @property
    def loss_at(self) -> int | None:
        """Where the unscaled loss terms are among the forward's outputs, or None."""
        if not self.layout["loss"]:
            return None
        return self.seeded + len(self.layout["others"])

    @property
    def preds_at(self) -> int:
        """Where the predictions start among the forward's outputs."""
        return self.seeded + len(self.layout["others"]) + (1 if self.layout["loss"] else 0)


class Queue:
    """A FIFO queue of one tensor, made once on the sender's device, where its reads run too
    (a queue's operations run where it lives: the reading loop sends its condition there at
    each iteration, docs/benchmarks.md)."""

    def __init__(self, device: str, spec: Any, capacity: int) -> None:
        self.device, self.spec = device, spec
        with tf.init_scope(), tf.device(device):
            self.queue = tf.queue.FIFOQueue(capacity, [spec.dtype])

    def put(self, value: Any) -> Any:
        """Enqueues `value` (an operation, on the sender's device)."""
        with tf.device(self.device):
            return self.queue.enqueue([value])

    def take(self) -> tf.Tensor:
        """The next value (dequeued on the sender's device, read on the caller's)."""
        with tf.device(self.device):
            got = self.queue.dequeue()
        got.set_shape(self.spec.shape)
        return got
