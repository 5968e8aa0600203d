"""Probe for issue #21: a pipelined step as one in-graph loop per rank (not the executor).

The executor traces 3 x M x K stage-function calls per step, and TensorFlow builds each
callee's body once per call operation while it optimises the step, so the first step grows
with M (`benchmarks/trace_cost.py`: 9.8x `model.fit`'s first step at K = 4, M = 64). This probe
checks, outside the library, whether the structure that #21 asks for reaches the target:

- each stage's forward is one `tf.function`, split with TensorFlow's own forward/backward pair
  (`ConcreteFunction._delayed_rewrite_functions.forward_backward`): the forward returns its
  outputs and the residuals its backward needs, the backward takes output gradients and
  residuals and returns input and weight gradients (equal to a tape's, checked below);
- each rank runs its schedule row as a `tf.while_loop` on its own device (one iteration per
  action, `tf.switch_case` on the action's kind), residuals kept in TensorLists indexed by
  micro-batch, weight gradients summed in loop variables;
- activations and gradients cross ranks through FIFO queues (enqueue on the sender's device,
  dequeue through a small non-inlined function, so no loop frame spans two devices).

Graph size is O(K), whatever M. Four TensorFlow behaviours it had to work around (each one
hung or silently skipped work until handled):
1. automatic control dependencies order every op that touches the same resource, so two rank
   loops sharing a queue ran one after the other (deadlock): the loops are built in a graph
   without them (`func_graph_from_py_func(add_control_dependencies=False)`);
2. Grappler specialises a function call for the outputs its caller uses, so a rank whose loop
   result was unused lost its enqueues: every rank's action count is returned and asserted;
3. a control dependency onto a constant is dropped by Grappler: tokens are Identities of a
   varying counter;
4. with `parallel_iterations` > 1, actions of one rank overlapped and queues were read out of
   order (weights off by 1e-2): one iteration at a time, which is also the schedule's meaning.
A queue made inside the step function failed with "Resource ... does not exist"; queues are
made once, eagerly, on their devices.

Model: the demo's character Transformer (`benchmarks.common.transformer`), `--blocks` blocks of
width `--width`, sequence 32, batch 4 M, SGD, 1F1B; `--layers plain` writes each block out in
plain Keras layers (about 100 layer calls at 12 blocks, #21's second model; token embedding
only). Prints the first step (trace + first run)
against `model.fit`'s on the same model and batch, the steady step, and the largest weight
difference from `model.fit` after one step, relative to the largest weight (exit status 1
above 1e-5).

Usage:
    python -m benchmarks.rank_loop_probe --stages 8 --micro-batches 64 --blocks 12
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

SEQ = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", default="blocks", choices=["blocks", "plain"],
                        help="blocks: each block one custom layer (the demo's); plain: each "
                        "block's LayerNormalization, MultiHeadAttention, Add, "
                        "LayerNormalization, Dense, Dense, Add as layers of the model")
    args = parser.parse_args()
    k, m = args.stages, args.micro_batches

    import tfpipe

    tfpipe.configure_cpu_devices(k)
    import keras
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.eager.polymorphic_function import concrete_function
    from tensorflow.python.framework import func_graph

    from benchmarks.common import transformer

    def plain(dim: int) -> keras.Model:
        """The demo's Transformer with every block written out in plain Keras layers."""
        ids = keras.Input((SEQ,), dtype="int32", name="ids")
        h = keras.layers.Embedding(96, dim, name="tokens")(ids)
        for i in range(args.blocks):
            n = keras.layers.LayerNormalization(name=f"norm1_{i}")(h)
            a = keras.layers.MultiHeadAttention(4, dim // 4, name=f"attention_{i}")(
                n, n, use_causal_mask=True)
            h = keras.layers.Add(name=f"add1_{i}")([h, a])
            n = keras.layers.LayerNormalization(name=f"norm2_{i}")(h)
            u = keras.layers.Dense(2 * dim, activation="gelu", name=f"up_{i}")(n)
            d = keras.layers.Dense(dim, name=f"down_{i}")(u)
            h = keras.layers.Add(name=f"add2_{i}")([h, d])
        h = keras.layers.LayerNormalization(name="final_norm")(h)
        return keras.Model(ids, keras.layers.Dense(96, name="logits")(h), name="plain_transformer")

    def build() -> keras.Model:
        keras.utils.set_random_seed(0)
        model = (transformer(vocab=96, seq_len=SEQ, dim=args.width, blocks=args.blocks)
                 if args.layers == "blocks" else plain(args.width))
        model.compile(keras.optimizers.SGD(0.1),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    batch, b = 4 * m, 4
    rng = np.random.default_rng(0)
    x = rng.integers(0, 96, (batch, SEQ)).astype("int32")
    y = rng.integers(0, 96, (batch, SEQ)).astype("int32")
    started = time.perf_counter()
    reference = build()
    reference.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
    keras_first = time.perf_counter() - started
    print(f"model.fit's first step: {keras_first:.2f} s", flush=True)

    model = build()
    started = time.perf_counter()
    pipe = tfpipe.Pipeline(model, stages=k, micro_batches=m, schedule="1f1b")
    print(f"split and placed: {time.perf_counter() - started:.2f} s", flush=True)
    stages, schedule = pipe.executor.stages, pipe.executor.schedule
    model_inputs = {id(t) for t in keras.tree.flatten(model.inputs)}
    producer = {id(t): st.index for st in stages for t in st.outputs or []}
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    class StageVjp:
        """A stage's forward (outputs + residuals) and backward (from residuals) functions."""

        def __init__(self, stage: Any) -> None:
            self.stage = stage
            self.in_ids = [id(t) for t in stage.inputs]
            self.last = stage.index == k - 1
            specs = [tf.TensorSpec((b, *t.shape[1:]), t.dtype) for t in stage.inputs]
            specs += [tf.TensorSpec((b, SEQ), tf.int32)] if self.last else []

            def forward(*xs: Any) -> list[Any]:
                outs = keras.tree.flatten(stage.model(list(xs[: len(self.in_ids)]), training=True))
                return [loss_fn(xs[-1], outs[0]) / m] if self.last else outs

            with tf.device(stage.device):
                self.cf = tf.function(forward, autograph=False).get_concrete_function(*specs)
            self.nout = len(self.cf.graph.outputs)
            self.fw, self.bw = self.cf._delayed_rewrite_functions.forward_backward(self.nout)
            outs = self.cf.graph.outputs  # now with the residuals appended
            self.shapes = [(o.shape, o.dtype) for o in outs]
            pos = {id(t): i for i, t in enumerate(outs)}
            self.bw_caps = [(pos.get(id(c)), c) for c in self.bw.captured_inputs]
            self.res = sorted({i for i, _ in self.bw_caps if i is not None})
            self.nargs = len(specs)
            by_handle = {id(v.value.handle): v for v in stage.trainable_variables}
            self.grad_vars = [by_handle.get(id(c)) for c in self.cf.captured_inputs]
            self.vars = [v for v in self.grad_vars if v is not None]

    fns = [StageVjp(st) for st in stages]

    class Queue:
        """A FIFO queue made once on `device`; dequeued through a non-inlined function."""

        def __init__(self, device: str, shape: Any, dtype: Any) -> None:
            with tf.device(device):
                self.q = tf.queue.FIFOQueue(m, [dtype], shapes=[shape])
            self.device = device

            def dequeue() -> Any:
                with tf.device(device):
                    return self.q.dequeue()

            self.dequeue = tf.function(dequeue, autograph=False,
                                       experimental_attributes={"_noinline": True})

        def enqueue(self, value: Any) -> Any:
            with tf.device(self.device):
                return self.q.enqueue([value])

    acts: dict[tuple[int, int], Queue] = {}  # (tensor id, consumer stage): sender -> receiver
    grads: dict[tuple[int, int], Queue] = {}  # the same key, gradients going back
    for c in fns:
        for i in c.in_ids:
            if i in model_inputs:
                continue
            pr = fns[producer[i]]
            shape, dtype = pr.shapes[[id(o) for o in pr.stage.outputs].index(i)]
            acts[(i, c.stage.index)] = Queue(pr.stage.device, shape, dtype)
            grads[(i, c.stage.index)] = Queue(c.stage.device, shape, dtype)

    def tlist(shape: Any, dtype: Any) -> Any:
        return tf.raw_ops.TensorListReserve(element_shape=shape, num_elements=m,
                                            element_dtype=dtype)

    def rank_loop(f: StageVjp, xs: Any, ys: Any) -> dict[str, Any]:
        st = f.stage
        row = schedule.ranks[schedule.rank_of(st.index)]
        kinds = tf.constant([{"F": 0, "B": 1}[a.kind] for a in row])
        mbs = tf.constant([a.micro_batch for a in row])
        consumers = [[c.stage.index for c in fns if id(o) in c.in_ids] for o in st.outputs]

        def body(n: Any, mine: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            mb = mbs[n]

            def done(out: dict[str, Any], after: list[Any]) -> dict[str, Any]:
                with tf.control_dependencies(after):
                    tick = tf.identity(mine["tick"])  # an Identity: Grappler keeps its deps
                return {**out, "tick": tick + 1}

            def forward() -> dict[str, Any]:
                with tf.control_dependencies([mine["tick"]]):
                    ins = [tf.gather(xs, mb) if i in model_inputs
                           else acts[(i, st.index)].dequeue() for i in f.in_ids]
                ins += [tf.gather(ys, mb)] if f.last else []
                outs = f.fw.call_flat(*ins, *f.cf.captured_inputs)
                out = dict(mine)
                sent = []
                if f.last:
                    out["loss"] = mine["loss"] + outs[0]
                else:
                    sent = [acts[(id(st.outputs[j]), c)].enqueue(o)
                            for j, o in enumerate(outs[: f.nout]) for c in consumers[j]]
                out["res"] = [tf.raw_ops.TensorListSetItem(input_handle=lst, index=mb,
                                                           item=outs[i])
                              for lst, i in zip(mine["res"], f.res)]
                return done(out, sent + out["res"] + [out["loss"]])

            def backward() -> dict[str, Any]:
                with tf.control_dependencies([mine["tick"]]):
                    seeds = [tf.ones(())] if f.last else [
                        tf.add_n([grads[(id(o), c)].dequeue() for c in consumers[j]])
                        for j, o in enumerate(st.outputs)]
                res = {i: tf.raw_ops.TensorListGetItem(
                    input_handle=lst, index=mb, element_shape=f.shapes[i][0],
                    element_dtype=f.shapes[i][1]) for lst, i in zip(mine["res"], f.res)}
                caps = [res[i] if i is not None else c for i, c in f.bw_caps]
                got = f.bw._call_flat(seeds, caps)
                sent = [grads[(i, st.index)].enqueue(g) for g, i in zip(got, f.in_ids)
                        if i not in model_inputs]
                weight_grads = [g for g, v in zip(got[f.nargs:], f.grad_vars) if v is not None]
                sums = [s if g is None else s + tf.convert_to_tensor(g)
                        for s, g in zip(mine["sums"], weight_grads)]
                return done({**mine, "sums": sums}, sent + sums)

            return n + 1, tf.switch_case(kinds[n], [forward, backward])

        with tf.device(st.device):
            init = {"res": [tlist(*f.shapes[i]) for i in f.res],
                    "sums": [tf.zeros(v.shape, v.dtype) for v in f.vars],
                    "loss": tf.zeros(()), "tick": tf.constant(0)}
            _, final = tf.while_loop(lambda n, _: n < len(row), body, (tf.constant(0), init),
                                     parallel_iterations=1)
        return final

    def region(xs: Any, ys: Any) -> list[Any]:
        finals = [rank_loop(f, xs, ys) for f in fns]
        return ([finals[-1]["loss"]] + [s for fin in finals for s in fin["sums"]]
                + [fin["tick"] for fin in finals])

    started = time.perf_counter()
    graph = func_graph.func_graph_from_py_func(
        "pipeline_ranks", region, [], {}, add_control_dependencies=False,
        signature=[tf.TensorSpec((m, b, SEQ), tf.int32)] * 2)
    ranks_fn = concrete_function.ConcreteFunction.from_func_graph(graph, None, {})
    variables = [v for f in fns for v in f.vars]

    def step(x: Any, y: Any) -> Any:
        out = ranks_fn._call_flat([tf.reshape(x, (m, b, SEQ)), tf.reshape(y, (m, b, SEQ))],
                                  ranks_fn.captured_inputs)
        sums, ticks = out[1 : 1 + len(variables)], tf.stack(out[1 + len(variables) :])
        ran = tf.debugging.assert_equal(ticks, tf.constant([len(r) for r in schedule.ranks]),
                                        message="a rank did not run its whole row")
        model.optimizer.apply(sums, variables)
        with tf.control_dependencies([ran]):
            return tf.identity(out[0])

    spec = tf.TensorSpec((batch, SEQ), tf.int32)
    concrete = tf.function(step, autograph=False).get_concrete_function(spec, spec)
    trace = time.perf_counter() - started
    ops = len(concrete.graph.get_operations()) + len(graph.get_operations())
    started = time.perf_counter()
    concrete(tf.constant(x), tf.constant(y))
    first = time.perf_counter() - started
    pairs = list(zip(model.get_weights(), reference.get_weights()))
    diff = (max(float(np.max(np.abs(p - q))) for p, q in pairs)
            / max(float(np.max(np.abs(q))) for _, q in pairs))
    steady = []
    for _ in range(3):
        started = time.perf_counter()
        concrete(tf.constant(x), tf.constant(y))
        steady.append(time.perf_counter() - started)
    print(f"rank loops {args.layers} K={k} M={m:3d} blocks={args.blocks}: "
          f"trace {trace:5.2f} s, {ops} ops, "
          f"first run {first:6.2f} s, steady {sorted(steady)[1]:5.2f} s; first step "
          f"{trace + first:6.2f} s vs model.fit's {keras_first:5.2f} s "
          f"({(trace + first) / keras_first:.1f}x); weights vs model.fit {diff:.1e} (relative)")
    sys.exit(0 if diff <= 1e-5 else 1)


if __name__ == "__main__":
    main()
