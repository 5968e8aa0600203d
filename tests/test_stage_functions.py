"""Each stage's forward is one function, traced once and called per micro-batch: the traced step
holds no per-micro-batch copy of any layer, and training still equals `model.fit`."""

from __future__ import annotations

import re

import keras
import numpy as np
import tensorflow as tf

import tfpipe
from tests.models import StepLog, assert_same_training, build, data


def traced_step(pipe: tfpipe.Pipeline, x: np.ndarray, y: np.ndarray) -> tf.Graph:
    with pipe._attached():  # noqa: SLF001 (tests only): the hooks fit installs
        step = tf.function(pipe.executor.train_step, autograph=False)
        return step.get_concrete_function((tf.constant(x), tf.constant(y))).graph


def test_layers_are_traced_once_per_stage_whatever_the_micro_batches():
    x, y = data("mlp", n=32)
    graphs = {}
    for m in (2, 8):
        pipe = tfpipe.Pipeline(build("mlp"), stages=4, micro_batches=m, schedule="1f1b",
                               rank_loops=False)  # the unrolled step (the loops: test_steady_loop)
        graphs[m] = traced_step(pipe, x, y)
    for m, graph in graphs.items():
        types = [op.type for op in graph.get_operations()]
        assert "MatMul" not in types  # every layer op sits in a stage function's body
        calls = [op for op in graph.get_operations() if op.type.endswith("PartitionedCall")]
        names = {op.get_attr("f").name for op in calls}
        forwards = {n for n in names if n.startswith("__forward_")}
        backwards = {n for n in names if "backward" in n}
        assert len(forwards) == len(backwards) == 4, names  # one of each per stage
        assert len(calls) >= 2 * 4 * m  # a forward and a backward call per stage per micro-batch
    growth = (len(graphs[8].get_operations()) - len(graphs[2].get_operations())) / 6
    assert growth < 200, growth  # a few call and slicing ops per micro-batch, not the layers


def test_each_stage_function_is_traced_once_over_a_whole_fit():
    x, y = data("mlp", n=64)
    ref, ref_log = build("mlp"), StepLog()
    ref.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = build("mlp"), StepLog()
    history = tfpipe.fit(model, x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                         callbacks=[log], stages=4, micro_batches=4, schedule="1f1b",
                         rank_loops=False)
    assert_same_training(ref, ref_log, model, log)
    functions = history.pipeline.executor.runner.functions
    counts = functions.tracing_counts()
    assert sorted(counts) == [(s, True) for s in range(4)]
    assert set(counts.values()) == {1}, counts


def test_uneven_micro_batches_trace_one_more_signature_only():
    keras.utils.set_random_seed(0)
    x, y = data("mlp", n=60)  # batches of 16: the last batch (12) splits into micro-batches of 3
    model = build("mlp")
    history = tfpipe.fit(model, x, y, batch_size=16, epochs=1, verbose=0, stages=2,
                         micro_batches=4)
    counts = history.pipeline.executor.runner.functions.tracing_counts()
    assert set(counts.values()) <= {1, 2}, counts


def test_fit_runs_the_unrolled_step_as_glue_and_its_stage_calls_with_every_pass(glue_calls):
    """The unrolled step's own graph (slicing, losses, gradient sums, call operations) is
    optimised as the rank loops' is, by Grappler's dependency optimiser alone (its first run at
    K = 4, M = 32 fell from 15.0 s to 8.5 s, steady step unchanged, docs/benchmarks.md); each
    stage function's call carries the options with every pass. Training still equals Keras."""
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2

    x, y = data("mlp")
    ref, ref_log = build("mlp"), StepLog()
    ref.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = build("mlp"), StepLog()
    history = tfpipe.fit(model, x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                         callbacks=[log], stages=2, micro_batches=2)
    assert history.pipeline.executor.loops is None  # the unrolled step
    assert len(glue_calls) == len(log.batches), glue_calls  # once per step
    assert_same_training(ref, ref_log, model, log)
    with history.pipeline._attached():  # noqa: SLF001 (tests only): the hooks fit installs
        step = tf.function(history.pipeline.executor.train_step, autograph=False)
        graph = step.get_concrete_function((tf.constant(x[:16]), tf.constant(y[:16]))).graph
    calls = [op for op in graph.get_operations()
             if op.type in ("PartitionedCall", "StatefulPartitionedCall")]
    assert len(calls) >= 6, calls  # per micro-batch a forward and a backward of each stage
    off = rewriter_config_pb2.RewriterConfig.OFF
    for op in calls:
        rewrite = config_pb2.ConfigProto.FromString(op.get_attr("config_proto"))
        assert rewrite.graph_options.rewrite_options.remapping != off, op.name


def test_a_large_gradient_is_summed_in_the_step_and_the_small_ones_in_one_call():
    """A weight of more than `OWN_SUM` elements gets its micro-batch sums as additions in the
    step's graph on its stage's device (the runtime can write them into the running sum's
    buffer); the small ones stay one sum call per stage and micro-batch. Training equals
    `model.fit`."""
    from tfpipe.executor.grads import OWN_SUM

    width = OWN_SUM // 8 + 1  # Dense(8 -> width): a kernel just over OWN_SUM elements

    def big() -> keras.Model:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(width, name="big"),
                                  keras.layers.Dense(3, name="head")])
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
        return model

    x, y = data("mlp", n=32)
    m = 4
    pipe = tfpipe.Pipeline(big(), stages=2, micro_batches=m, schedule="1f1b", rank_loops=False)
    graph = traced_step(pipe, x, y)
    big_shape = [8, width]
    adds = [op for op in graph.get_operations()
            if op.type == "AddV2" and op.outputs[0].shape.as_list() == big_shape]
    assert len(adds) == m - 1, [op.name for op in adds]
    assert {op.device for op in adds} == {pipe.stages[0].device}
    sum_calls = [op for op in graph.get_operations() if op.type.endswith("PartitionedCall")
                 and "_sum_pairs" in op.get_attr("f").name]
    # stage 0's bias (small) and stage 1's kernel and bias: one call per stage per later mb
    assert len(sum_calls) == 2 * (m - 1), [op.get_attr("f").name for op in sum_calls]
    ref, ref_log = big(), StepLog()
    ref.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = big(), StepLog()
    tfpipe.fit(model, x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[log],
               stages=2, micro_batches=m, schedule="1f1b", rank_loops=False)
    assert_same_training(ref, ref_log, model, log)


def _live_input_gradient_products(graph: tf.Graph, layer: str) -> list[str]:
    """The products `dy @ kernel^T` (a Dense layer's input gradient) of `layer` that some
    output of a backward function in `graph`'s library depends on (the others are pruned
    when the function is instantiated)."""
    found = []
    for f in graph.as_graph_def().library.function:
        if "backward" not in f.signature.name:
            continue
        nodes = {n.name: n for n in f.node_def}
        live: set[str] = set()
        todo = [v.split(":")[0] for v in f.ret.values()] + list(f.control_ret.values())
        while todo:
            name = todo.pop()
            if name in live or name not in nodes:
                continue
            live.add(name)
            todo += [i.lstrip("^").split(":")[0] for i in nodes[name].input]
        found += [n for n in live if re.search(rf"/{layer}(_\d+)?/MatMul_grad/MatMul$", n)
                  and nodes[n].op == "MatMul" and nodes[n].attr["transpose_b"].b]
    return found


def test_no_stage_function_computes_a_gradient_for_the_data():
    # TensorFlow's gradient of a function call computes one for each float input; for the
    # model's own inputs nobody reads it (Keras never differentiates by the data), and a
    # call that is not inlined cannot drop it: the first Dense's input gradient, a
    # batch x in x out product per micro-batch that model.fit does not run
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 16)).astype("float32")
    y = rng.integers(0, 3, size=32)

    def model() -> keras.Model:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((16,))
        h = keras.layers.Dense(8, activation="relu", name="first")(inputs)
        h = keras.layers.Dense(8, activation="relu", name="mid")(h)
        out = keras.layers.Dense(3, name="head")(h)
        built = keras.Model(inputs, out)
        built.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
        return built

    for loops in (False, "steady"):  # the unrolled step, and the loops' stage pairs
        pipe = tfpipe.Pipeline(model(), stages=2, micro_batches=4, schedule="1f1b",
                               balance=[2, 1], rank_loops=loops)
        graph = traced_step(pipe, x, y)
        assert _live_input_gradient_products(graph, "first") == [], loops
        # the check can see one: the second layer's input gradient feeds the first's weights
        assert _live_input_gradient_products(graph, "mid"), loops
    ref = model()
    ref.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    piped = model()
    tfpipe.fit(piped, x, y, batch_size=32, epochs=2, shuffle=False, verbose=0, stages=2,
               micro_batches=4, schedule="1f1b", balance=[2, 1])
    for a, b in zip(ref.get_weights(), piped.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_split_backward_runs_each_stage_gradient_once_per_micro_batch():
    # A stage's gradient function computes its input and weight gradients in one call, so the
    # `I` of a zero-bubble schedule keeps both and its `W` calls nothing: as many backward
    # calls as 1F1B's (a `W` that asked the tape again ran every backward twice)
    x, y = data("mlp", n=32)
    calls = {}
    for schedule in ("1f1b", "zb-h1"):
        pipe = tfpipe.Pipeline(build("mlp"), stages=2, micro_batches=4, schedule=schedule,
                               rank_loops=False)
        graph = traced_step(pipe, x, y)
        calls[schedule] = sum(1 for op in graph.get_operations()
                              if op.type.endswith("PartitionedCall")
                              and "backward" in op.get_attr("f").name)
    assert calls == {"1f1b": 2 * 4, "zb-h1": 2 * 4}  # K x M (12 for zb-h1 before)
    ref, ref_log = build("mlp"), StepLog()
    ref.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = build("mlp"), StepLog()
    tfpipe.fit(model, x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[log],
               stages=2, micro_batches=4, schedule="zb-h1")
    assert_same_training(ref, ref_log, model, log)
