"""Rank loops (`tfpipe.executor.rankloop`): one in-graph loop per rank equals `model.fit`, its
graph grows with K and not with M, each loop runs on its rank's device, and what the loops do
not run yet is refused by name (with `rank_loops=True`) or runs unrolled (`"auto"`)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpipe
from tests.models import MODELS, StepLog, assert_same_training, build, data
from tfpipe.errors import PipelineError


def fit_both(make, x, y, batch_size=16, sample_weight=None, rank_loops=True, **pipeline):
    """`model.fit` and `tfpipe.fit(rank_loops=...)` on fresh copies of one model (`True`: the
    rank loops; `"steady"`: the steady loop, `tests/test_steady_loop.py`)."""
    ref, ref_log = make(), StepLog()
    ref.fit(x, y, sample_weight=sample_weight, batch_size=batch_size, epochs=2, shuffle=False,
            verbose=0, callbacks=[ref_log])
    model, log = make(), StepLog()
    history = tfpipe.fit(model, x, y, sample_weight=sample_weight, batch_size=batch_size,
                         epochs=2, shuffle=False, verbose=0, callbacks=[log],
                         rank_loops=rank_loops, **pipeline)
    kind = "SteadyLoop" if rank_loops == "steady" else "RankLoops"
    assert type(history.pipeline.executor.loops).__name__ == kind, f"{kind} did not run"
    return ref, ref_log, model, log


@pytest.mark.parametrize("kind,opt,stages,micro_batches,schedule", [
    ("mlp", "adam", 2, 4, "1f1b"),
    ("functional", "sgd", 4, 8, "gpipe"),
    ("cnn", "adam", 2, 2, "1f1b"),
    ("deep", "sgd", 4, 4, "interleaved"),  # two stages per rank; Adam: see test_schedule_execution
])
def test_rank_loops_equal_keras(kind, opt, stages, micro_batches, schedule):
    x, y = data(kind)
    ref, ref_log, model, log = fit_both(lambda: build(kind, opt), x, y, stages=stages,
                                        micro_batches=micro_batches, schedule=schedule)
    assert_same_training(ref, ref_log, model, log)


def skip_model() -> keras.Model:
    """A skip connection from stage 0 to the last stage, an int tensor between stages, an
    activity regulariser, a kernel regulariser and an embedding (sparse gradients)."""
    keras.utils.set_random_seed(0)
    ids = keras.Input((6,), dtype="int32", name="ids")
    e = keras.layers.Embedding(20, 8, name="embed")(ids)
    h = keras.layers.Flatten(name="flat")(e)
    first = keras.layers.Dense(16, activation="relu", name="first",
                               activity_regularizer=keras.regularizers.L2(1e-3))(h)
    count = keras.layers.Lambda(lambda t: tf.reduce_sum(tf.cast(t > 0, "int32"), -1,
                                                        keepdims=True), name="count")(first)
    mid = keras.layers.Dense(16, activation="tanh", name="mid",
                             kernel_regularizer=keras.regularizers.L2(1e-2))(first)
    mid = keras.layers.Dense(16, activation="tanh", name="mid2")(mid)
    joined = keras.layers.Concatenate(name="join")([
        mid, first, keras.layers.Lambda(lambda t: tf.cast(t, "float32"), name="back")(count)])
    out = keras.layers.Dense(3, activation="softmax", name="head")(joined)
    model = keras.Model(ids, out, name="skips")
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def test_skips_sparse_gradients_losses_sample_weights_and_a_short_last_batch():
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 20, (38, 6)).astype("int32"), rng.integers(0, 3, 38)
    weights = rng.uniform(0.5, 2.0, 38).astype("float32")
    # 38 = 2 x 16 + 6: the last batch's 4 micro-batches hold 2, 2, 1, 1 samples
    ref, ref_log, model, log = fit_both(skip_model, x, y, sample_weight=weights,
                                        split_points=["mid", "mid2", "join"], micro_batches=4,
                                        schedule="1f1b")
    assert len(model.losses) == 2  # the activity and the kernel regularisers both trained
    assert_same_training(ref, ref_log, model, log)


def test_stages_are_traced_for_the_micro_batch_size_and_a_short_batch_for_any_size():
    """Equal micro-batches of a batch whose size is known when tracing: each stage's functions
    take that size (static shapes let Grappler drop the gradients' broadcast reductions: the
    steady step went from 1.24x the unrolled step's to 1.15x, docs/benchmarks.md); a short
    last batch builds the loops once more, for any size, and trains as `model.fit`."""
    x, y = data("mlp", n=48)  # three batches of 16
    ref, model = build("mlp"), build("mlp")
    ref.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    pipe = tfpipe.Pipeline(model, stages=2, micro_batches=4, rank_loops=True)
    pipe.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    loops = pipe.executor.loops
    assert loops.micro == 4
    first, last = (p.function.structured_input_signature[0] for p in loops.pairs)
    assert first[0].shape == (4, 8) and last[1].shape == (4,), (first, last)  # input, labels
    assert loops.variants == {}
    ref_log, log = StepLog(), StepLog()  # then batches of 16, 16 and 8
    ref.fit(x[:40], y[:40], batch_size=16, shuffle=False, verbose=0, callbacks=[ref_log])
    pipe.fit(x[:40], y[:40], batch_size=16, shuffle=False, verbose=0, callbacks=[log])
    assert list(loops.variants) == [None]
    assert loops.variants[None].pairs[0].function.structured_input_signature[0][0].shape[0] is None
    assert_same_training(ref, ref_log, model, log)


def traced_step(model, stages, micro_batches, rank_loops=True):
    """The pipelined training step traced for batch 8 * M, and the pipeline."""
    pipe = tfpipe.Pipeline(model, stages=stages, micro_batches=micro_batches, schedule="1f1b",
                           rank_loops=rank_loops)
    spec = (tf.TensorSpec((8 * micro_batches, 8), tf.float32), tf.TensorSpec((None,), tf.int64))
    with pipe._attached():
        step = tf.function(lambda x, y: pipe.executor.train_step((x, y)), autograph=False)
        concrete = step.get_concrete_function(*spec)
    return pipe, concrete


def test_graph_grows_with_stages_not_micro_batches():
    sizes = {}
    for k, m in [(2, 4), (2, 32), (4, 4), (4, 32)]:
        pipe, concrete = traced_step(build("deep"), k, m)
        sizes[(k, m)] = (len(concrete.graph.get_operations()), pipe.executor.loops.operation_count())
    for k in (2, 4):  # M x 8 more micro-batches: a handful of operations more, not 8x
        assert sizes[(k, 32)][0] - sizes[(k, 4)][0] <= 8, sizes
        assert sizes[(k, 32)][1] == sizes[(k, 4)][1], sizes
    assert sizes[(4, 4)][1] > sizes[(2, 4)][1], sizes  # more ranks: more loops


def test_each_rank_loop_and_its_stage_calls_run_on_the_rank_device():
    pipe, _ = traced_step(build("deep"), 4, 4)
    region = pipe.executor.loops.region.graph
    loops = [op for op in region.get_operations() if op.type in ("While", "StatelessWhile")]
    assert sorted(tf.DeviceSpec.from_string(op.device).device_index for op in loops) == [0, 1, 2, 3]
    for op in loops:
        body = region._get_function(op.get_attr("body").name).graph
        calls = [c for c in body.get_operations() if c.type in ("Case", "StatelessCase")]
        assert calls and all(c.device == op.device or not c.device for c in calls), op.device
        names = {f.name for c in calls for f in c.get_attr("branches")}
        assert len(names) == 2, names  # F and B of the rank's one stage


def test_rank_loops_true_refuses_what_they_do_not_run_with_the_grid():
    with pytest.raises(PipelineError, match=r"do not run recompute(.|\n)*rank0  F0"):
        tfpipe.Pipeline(build("deep"), stages=2, micro_batches=2, schedule="1f1b",
                        recompute="always", rank_loops=True)
    with pytest.raises(PipelineError, match=r"splits backward into I and W"):
        tfpipe.Pipeline(build("deep"), stages=2, micro_batches=2, schedule="zb-h1",
                        rank_loops=True)


def test_the_loops_refuse_gpu_stages_whose_queues_would_be_in_host_memory():
    """TensorFlow's queues have CPU kernels only, so a queue made for a GPU stage would be
    placed on the host and every activation would cross through host memory: refused (so
    `"auto"` runs the unrolled step there). No GPU here: the check reads the devices."""
    from types import SimpleNamespace

    from tfpipe.executor.rankloop import loops_refusal

    runner = SimpleNamespace(opaque=False, output_ids=[1])
    gpu, cpu = (SimpleNamespace(index=k, device=f"/job:localhost/replica:0/task:0/device:{d}:0")
                for k, d in ((0, "GPU"), (1, "CPU")))
    reason = loops_refusal(runner, [gpu, cpu], None, {"profile": False})
    assert reason == ("the rank loops do not run stages on GPUs (stages [0]: their queues "
                      "would be in host memory) yet"), reason
    assert "GPU" not in loops_refusal(runner, [cpu], None, {"profile": True})


def test_the_default_runs_the_steady_loop_where_it_can_and_unrolls_elsewhere():
    """`rank_loops="auto"` (the default): the steady loop for a schedule with a steady phase
    and no feature it does not run (nor XLA); the unrolled step otherwise; the rank loops
    only when asked for."""

    def loops(**kwargs):
        options = {"stages": 2, "micro_batches": 4, "schedule": "1f1b", **kwargs}
        return type(tfpipe.Pipeline(build("deep"), **options).executor.loops).__name__

    assert loops() == "SteadyLoop"
    assert loops(rank_loops=True) == "RankLoops"
    assert loops(rank_loops=False) == "NoneType"
    assert loops(schedule="gpipe") == loops(schedule="zb-h1") == "NoneType"
    assert loops(micro_batches=2) == "NoneType"  # one steady iteration: nothing to loop
    assert loops(recompute="always") == loops(check_numerics=True) == "NoneType"
    # with XLA the steady loop's steady step was slower (docs/benchmarks.md): asked for only
    assert loops(jit_compile=True) == "NoneType"
    assert loops(jit_compile=True, rank_loops="steady") == "SteadyLoop"


class StopsGradient(keras.layers.Layer):
    """Passes its input on with no gradient back."""

    def call(self, x):
        return keras.ops.stop_gradient(x)


def stopped_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    h = keras.layers.Dense(8, activation="tanh", name="first")(inputs)
    h = keras.layers.Dense(8, activation="relu")(StopsGradient(name="stop")(h))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(h))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    return model


def test_the_default_unrolls_a_model_the_steady_loop_refuses_when_tracing():
    """Stage 1 gives no gradient for the input stage 0 sends it, which shows only once the
    stage is traced: `rank_loops="steady"` says so; the default trains it unrolled, as
    `model.fit` does."""
    x, y = data("mlp")
    with pytest.raises(PipelineError, match=r"stage 1 \(stop, .*gives no gradient"):
        tfpipe.fit(stopped_model(), x, y, batch_size=16, verbose=0, split_points=["stop"],
                   micro_batches=4, schedule="1f1b", rank_loops="steady")
    ref, ref_log = stopped_model(), StepLog()
    ref.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = stopped_model(), StepLog()
    history = tfpipe.fit(model, x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                         callbacks=[log], split_points=["stop"], micro_batches=4,
                         schedule="1f1b")
    assert history.pipeline.executor.loops is None
    assert_same_training(ref, ref_log, model, log)


def test_a_frozen_first_stage_that_sends_only_integers():
    """Stage 0 has no weights and sends an int tensor: nothing to differentiate there."""
    from tests.test_functional_graphs import X8, Y3, frozen_argmax_router, make

    ref, ref_log, model, log = fit_both(lambda: make(frozen_argmax_router, "sgd"), X8, Y3,
                                        split_points=["embed"], micro_batches=4)
    assert_same_training(ref, ref_log, model, log)


def _rewrite(serialized: bytes):
    """The Grappler options in a serialized `ConfigProto`."""
    from tensorflow.core.protobuf import config_pb2

    return config_pb2.ConfigProto.FromString(serialized).graph_options.rewrite_options


def test_glue_only_optimises_the_step_lightly_and_its_stage_functions_fully():
    from tensorflow.core.protobuf import rewriter_config_pb2
    from tensorflow.python.eager import context

    from tfpipe._keras import functions

    off, one = rewriter_config_pb2.RewriterConfig.OFF, rewriter_config_pb2.RewriterConfig.ONE
    ctx = context.context()
    before = ctx.function_call_options
    with functions.stage_options():  # outside a glue_only call: nothing changes
        assert ctx.function_call_options is before
    with functions.glue_only():
        glue = _rewrite(ctx.function_call_options.config_proto_serialized)
        assert glue.remapping == off and glue.constant_folding == off
        assert glue.dependency_optimization != off and glue.meta_optimizer_iterations == one
        with functions.stage_options():
            stage = _rewrite(ctx.function_call_options.config_proto_serialized)
            assert stage.remapping != off and stage.constant_folding != off
            assert stage.meta_optimizer_iterations == one
        assert _rewrite(ctx.function_call_options.config_proto_serialized).remapping == off
    assert ctx.function_call_options is before


def test_fit_calls_the_step_as_glue_and_each_stage_call_with_every_pass(glue_calls):
    """The step `fit` runs is traced and called under `glue_only`; the call operations of the
    stage functions inside the rank loops carry the options with every Grappler pass."""
    from tensorflow.core.protobuf import rewriter_config_pb2

    x, y = data("deep")
    history = tfpipe.fit(build("deep"), x[:32], y[:32], batch_size=16, epochs=1, verbose=0,
                         stages=2, micro_batches=2, schedule="1f1b", rank_loops=True)
    assert len(glue_calls) == 2, glue_calls  # once per step (2 batches)
    stage_calls = [op for op in loop_body_ops(history.pipeline)
                   if op.type in ("PartitionedCall", "StatefulPartitionedCall")]
    off = rewriter_config_pb2.RewriterConfig.OFF
    assert len(stage_calls) >= 4, stage_calls  # F and B of each stage, and the queue reads
    for op in stage_calls:
        assert _rewrite(op.get_attr("config_proto")).remapping != off, op.name


def test_each_rank_splits_its_own_gradient_sums_on_its_device():
    """After the loops, a rank's flat gradient sums are split into per-variable gradients on
    the rank's device: not on device 0 (each sum would cross to it and back)."""
    pipe, _ = traced_step(build("deep"), 4, 4)
    region = pipe.executor.loops.region.graph
    splits = [op for op in region.get_operations() if op.type in ("Split", "SplitV")]
    devices = sorted(tf.DeviceSpec.from_string(op.device).device_index for op in splits)
    assert devices == [0, 1, 2, 3], [(op.name, op.device) for op in splits]
    for op in region.get_operations():
        if op.type == "Reshape" and op.inputs[0].op.type in ("Split", "SplitV"):
            assert op.device == op.inputs[0].op.device, op.name


def test_a_large_weight_is_summed_alone_and_small_ones_together():
    """A variable of more than `OWN_SUM` elements is summed in its own loop variable (in one
    flat sum with the others its gradient was copied at every backward), the small ones in
    one sum per dtype; training equals Keras."""
    from tfpipe.executor.stagepair import OWN_SUM

    def make() -> keras.Model:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((320,)), keras.layers.Dense(320, name="wide"),
                                  keras.layers.Dense(8, name="small"),
                                  keras.layers.Dense(OWN_SUM // 8 + 1, name="big"),
                                  keras.layers.Dense(3, name="head")])
        model.compile(keras.optimizers.SGD(0.1),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 320)).astype("float32"), rng.integers(0, 3, 32)
    ref, ref_log = make(), StepLog()
    ref.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = make(), StepLog()
    history = tfpipe.fit(model, x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                         callbacks=[log], rank_loops=True, stages=2, micro_batches=2,
                         balance=[2, 2])
    assert_same_training(ref, ref_log, model, log)
    names = [[[pair.stage.trainable_variables[k].path.split("/", 1)[1] for k in group]
              for group in pair.dense_groups()] for pair in history.pipeline.executor.loops.pairs]
    assert names == [[["wide/kernel"], ["wide/bias", "small/kernel", "small/bias"]],
                     [["big/kernel"], ["big/bias", "head/kernel", "head/bias"]]], names


def loop_body_ops(pipe) -> list:
    """Every operation in the rank loops' bodies and branches (not in the stage functions)."""
    from tests.cluster_client import called_functions

    region = pipe.executor.loops.region.graph
    known, found = dict(region._functions), []
    stack = [op for op in region.get_operations() if op.type in ("While", "StatelessWhile")]
    while stack:
        op = stack.pop()
        for name in called_functions(op):
            if name in known and op.type not in ("PartitionedCall", "StatefulPartitionedCall"):
                graph = known[name].graph
                known.update(getattr(graph, "_functions", {}))
                found += graph.get_operations()
                stack += graph.get_operations()
    return found


@pytest.mark.parametrize("schedule,micro_batches,store", [
    ("1f1b", 4, "RingStore"), ("gpipe", 12, "ListStore")])
def test_residuals_wait_in_slots_or_lists_and_train_like_keras(schedule, micro_batches, store):
    """Up to `MAX_SLOTS` micro-batches in flight: one packed value per slot, so a forward and
    a backward run a handful of operations whatever the stage's residual count; more (GPipe,
    M = 12): a TensorList write and read per residual. Both train as `model.fit`."""
    from tfpipe.executor.residuals import MAX_SLOTS

    assert micro_batches <= MAX_SLOTS or store == "ListStore"
    x, y = data("deep")
    ref, ref_log, model, log = fit_both(lambda: build("deep", "sgd"), x, y, batch_size=24,
                                        stages=2, micro_batches=micro_batches, schedule=schedule)
    assert_same_training(ref, ref_log, model, log)
    pipe = tfpipe.Pipeline(build("deep", "sgd"), stages=2, micro_batches=micro_batches,
                           schedule=schedule, rank_loops=True)
    spec = (tf.TensorSpec((24, 8), tf.float32), tf.TensorSpec((None,), tf.int64))
    with pipe._attached():
        tf.function(lambda a, b: pipe.executor.train_step((a, b)),
                    autograph=False).get_concrete_function(*spec)
    loops = pipe.executor.loops
    assert {type(s).__name__ for s in loops.stores.values()} == {store}
    residuals = sum(len(p.residuals) for p in loops.pairs)
    writes = sum(op.type == "TensorListSetItem" for op in loop_body_ops(pipe))
    if store == "RingStore":  # the predictions' list only (the last stage's forward)
        assert writes <= 2 < residuals, (writes, residuals)
    else:
        assert writes >= residuals, (writes, residuals)


@pytest.mark.parametrize("name", ["adamw", "ema", "grad_accumulation", "lr_schedule"])
def test_optimizers_that_write_before_the_update_equal_keras(name):
    """AdamW decays each weight before applying its gradient, with no data dependency on the
    gradients: it must wait for every stage call of the loops to have read the weights (it
    did not, and the first step's loss differed by 9e-5)."""
    from tests.test_training_features import OPTIMIZERS

    def make():
        keras.utils.set_random_seed(0)
        model = MODELS["mlp"]()
        model.compile(OPTIMIZERS[name](), "sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    x, y = data("mlp")
    ref, ref_log, model, log = fit_both(make, x, y, stages=4, micro_batches=4, schedule="1f1b")
    assert_same_training(ref, ref_log, model, log)


def test_each_loop_reads_the_batch_on_its_own_device_and_never_waits_on_the_host():
    """Each rank's share of the batch (a TensorList on the host) moves to the rank's device
    once, before its loop, and the loop reads its micro-batches there: no operation of a
    loop runs on the host. Read on the host, each iteration of a loop on a worker waited on
    the host (1.40x the unrolled step's time on two workers, M = 16); passed into the loop,
    the list crossed at every forward (2.04x the least bytes a step needs over loopback);
    `benchmarks/traffic.py --rank-loops true`, docs/benchmarks.md."""
    from tfpipe.devices import HOST, canonical
    from tfpipe.traffic import placed_transfers

    x, y = data("mlp", n=32)
    pipe = tfpipe.Pipeline(build("mlp"), stages=2, micro_batches=2, schedule="1f1b",
                           devices=["/cpu:1", "/cpu:2"], rank_loops=True)
    with pipe._attached():
        step = tf.function(lambda a, b: pipe.executor.train_step((a, b)), autograph=False)
        with pipe.executor.glue_options():
            sent = placed_transfers(step, tf.constant(x), tf.constant(y))
    reads = [op for op in loop_body_ops(pipe) if op.type == "TensorListGetItem"]
    assert sorted(canonical(op.device)[-5:] for op in reads) == ["CPU:1", "CPU:2"]  # x, y
    host = canonical(HOST)
    in_loops = [t for t in sent if host in (t.source, t.target) and "/body/" in t.tensor]
    assert in_loops == [], in_loops  # nothing crosses between a loop and the host
    lists = [t for t in sent if t.tensor.startswith("TensorListSplit")]  # x to 1, y to 2
    assert sorted(t.target[-5:] for t in lists) == ["CPU:1", "CPU:2"], lists
    assert all("/enter/" in r for t in lists for r in t.readers), lists  # once, into the loop
