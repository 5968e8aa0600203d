"""The steady loop (`tfpipe.executor.steadyloop`): a schedule's steady phase traced once, as one
in-graph loop over all devices, equals `model.fit`; its graph grows with K, not with M."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tfpipe
from tests.models import assert_same_training, build, data
from tests.test_rank_loops import fit_both as rank_loops_fit_both
from tests.test_rank_loops import skip_model, traced_step
from tfpipe.errors import PipelineError


def fit_both(make, x, y, **kwargs):
    """`model.fit` and `tfpipe.fit(rank_loops="steady")` on fresh copies of one model."""
    return rank_loops_fit_both(make, x, y, rank_loops="steady", **kwargs)


@pytest.mark.parametrize("kind,opt,stages,micro_batches,schedule", [
    ("mlp", "adam", 2, 4, "1f1b"),
    ("functional", "sgd", 4, 8, "1f1b"),
    ("cnn", "adam", 2, 4, "1f1b"),
    ("deep", "sgd", 4, 6, "1f1b"),  # Adam: see test_schedule_execution
])
def test_steady_loop_equals_keras(kind, opt, stages, micro_batches, schedule):
    x, y = data(kind)
    ref, ref_log, model, log = fit_both(lambda: build(kind, opt), x, y, stages=stages,
                                           micro_batches=micro_batches, schedule=schedule)
    assert_same_training(ref, ref_log, model, log)


def test_skips_sparse_gradients_losses_sample_weights_and_a_short_last_batch():
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 20, (46, 6)).astype("int32"), rng.integers(0, 3, 46)
    weights = rng.uniform(0.5, 2.0, 46).astype("float32")
    # 46 = 2 x 16 + 14: the last batch's 6 micro-batches hold 3, 3, 2, 2, 2, 2 samples
    ref, ref_log, model, log = fit_both(skip_model, x, y, sample_weight=weights,
                                           split_points=["mid", "mid2", "join"],
                                           micro_batches=6, schedule="1f1b")
    assert_same_training(ref, ref_log, model, log)


def traced(stages, micro_batches):
    """The steady loop's training step of the deep model traced for batch 8 * M."""
    return traced_step(build("deep"), stages, micro_batches, rank_loops="steady")


def test_graph_grows_with_stages_not_micro_batches():
    sizes = {}
    for k, m in [(2, 4), (2, 32), (4, 8), (4, 32)]:
        pipe, concrete = traced(k, m)
        sizes[(k, m)] = (len(concrete.graph.get_operations()), pipe.executor.loops.operation_count())
    for k, m in ((2, 4), (4, 8)):  # more micro-batches: a handful of operations more, not 4-8x
        assert sizes[(k, 32)][0] - sizes[(k, m)][0] <= 8, sizes
        assert sizes[(k, 32)][1] == sizes[(k, m)][1], sizes
    assert sizes[(4, 8)][1] > sizes[(2, 4)][1], sizes  # more stages: a longer warm-up


def test_three_loops_run_each_stage_once_per_iteration_on_its_device():
    """1F1B, K = 4: the warm-up, steady phase and cool-down are three loops over the same body,
    one forward and one backward call per stage, each placed on its stage's device; in the
    warm-up and cool-down an action whose micro-batch exists in some iterations but not all
    is in a `cond` on it existing (the forwards of stages 1 and 2: stage 0's exist in every
    warm-up iteration, stage 3's in none; no backward runs in the warm-up), and nothing is
    traced action by action."""
    pipe, _ = traced(4, 8)
    loops = pipe.executor.loops
    region = loops.region.graph
    calls = ("PartitionedCall", "StatefulPartitionedCall")
    assert not [op for op in region.get_operations() if op.type in calls]
    whiles = [op for op in region.get_operations() if op.type in ("While", "StatelessWhile")]
    assert len(whiles) == 3

    def name(n):
        return n.decode() if isinstance(n, bytes) else n

    expected = sorted((name(fn.name), st.index) for st, pair in zip(loops.stages, loops.pairs)
                      for fn in (pair.fw, pair.bw))
    conds = []
    for loop in whiles:
        body = region._get_function(loop.get_attr("body").name).graph
        conds.append([op for op in body.get_operations() if op.type in ("If", "StatelessIf")])
        if conds[-1]:  # masked: the calls are in the branches
            assert len(conds[-1]) == 2
            assert all(tf.DeviceSpec.from_string(op.device).device_index is not None
                       for op in conds[-1])
            continue
        placed = sorted((op.get_attr("f").name, tf.DeviceSpec.from_string(op.device).device_index)
                        for op in body.get_operations() if op.type in calls)
        assert [(name(n), d) for n, d in placed] == expected
    assert [bool(c) for c in conds] == [True, False, True]
    assert loops.cut.edges_as_iterations() == (3, 3)


def test_steady_refuses_what_it_does_not_run_with_the_grid():
    with pytest.raises(PipelineError, match=r"no steady phase(.|\n)*rank0  F0"):
        tfpipe.Pipeline(build("deep"), stages=2, micro_batches=4, schedule="gpipe",
                        rank_loops="steady")
    with pytest.raises(PipelineError, match=r"steady loop do not run recompute"):
        tfpipe.Pipeline(build("deep"), stages=2, micro_batches=4, schedule="1f1b",
                        recompute="always", rank_loops="steady")
    with pytest.raises(PipelineError, match=r"no steady phase"):  # one iteration: nothing to loop
        tfpipe.Pipeline(build("deep"), stages=4, micro_batches=4, schedule="1f1b",
                        rank_loops="steady")


def test_a_layer_shared_by_two_stages_and_skips_across_four_equal_keras():
    """One variable read by stages 0 and 2 (its gradient summed from both), and skip
    connections across stages (carried for as many iterations as they span)."""
    from tests.test_functional_graphs import X8, Y3, residual_mlp, shared_layer
    from tests.test_functional_graphs import fit_both as graph_fit_both

    pipe, _, _ = graph_fit_both(shared_layer, X8, Y3, dict(balance=[1, 2, 2], micro_batches=4,
                                                          schedule="1f1b", rank_loops="steady"))
    assert type(pipe.executor.loops).__name__ == "SteadyLoop"
    pipe, _, _ = graph_fit_both(residual_mlp, X8, Y3, dict(stages=4, micro_batches=8,
                                                          schedule="1f1b", rank_loops="steady"))
    assert type(pipe.executor.loops).__name__ == "SteadyLoop"
    spans = [d for key, _, d, _ in pipe.executor.loops.carried if key[0] == "act"]
    assert max(spans) >= 2, spans  # an activation read two or more stages on


def test_stages_with_the_same_graph_share_one_traced_pair():
    """Stages whose forward graphs differ only in names (two `Dense(8, relu)` stages) share one
    forward and backward function, each called with its own weights; stages whose graphs
    differ (another activation, the data's stopped gradient, the loss) get their own;
    training equals `model.fit`."""

    def make():
        keras = tf.keras
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((8,)),
            keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3, activation="softmax")])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        return model

    x, y = data("mlp")
    ref, ref_log, model, log = fit_both(make, x, y, stages=4, micro_batches=8, schedule="1f1b")
    assert_same_training(ref, ref_log, model, log)
    pipe = tfpipe.Pipeline(make(), stages=4, micro_batches=8, schedule="1f1b",
                           rank_loops="steady")
    with pipe._attached():
        pipe.executor.train_step((tf.constant(x[:16]), tf.constant(y[:16])))
    pairs = pipe.executor.loops.pairs
    assert pairs[1].fw is pairs[2].fw and pairs[1].bw is pairs[2].bw
    assert len({id(p.fw) for p in pairs}) == 3 and len({id(p.bw) for p in pairs}) == 3
    assert pairs[1].function.captured_inputs[0] is not pairs[2].function.captured_inputs[0]


def test_traffic_of_a_pipeline_that_runs_the_steady_loop_is_its_unrolled_steps():
    """The placed graphs hold a loop's sends once per loop, so `traffic` measures the unrolled
    step of the same stages and schedule, and says so under the table."""
    x, y = data("mlp", n=16)
    tables = {}
    for loops in ("auto", False):
        pipe = tfpipe.Pipeline(build("mlp"), stages=2, micro_batches=4, schedule="1f1b",
                               devices=["/cpu:1", "/cpu:2"], rank_loops=loops)
        tables[loops] = pipe.traffic(x, y, print_fn=lambda _: None)
        assert (pipe.executor.loops is None) == (loops is False)
    assert tables["auto"].startswith(tables[False] + "\n")
    assert "activations" in tables[False] and "/device:CPU:1 -> /device:CPU:2" in tables[False]
    assert "The unrolled step of these stages" in tables["auto"]


def test_no_value_crosses_between_a_loop_and_the_host_per_iteration():
    """Each loop's counter and condition sit on the first stage's device, so an iteration
    needs nothing from the host: on the host, every iteration sent the condition to each
    stage's device and the counter to those that index the batch with it (on workers, a
    message from the client to each worker per iteration). What remains between the host
    and the devices crosses once per step: the batch's lists and loss weights into the
    loops, the results out of them."""
    from tfpipe.devices import HOST, canonical
    from tfpipe.traffic import placed_transfers

    x, y = data("mlp", n=32)
    pipe = tfpipe.Pipeline(build("mlp"), stages=2, micro_batches=8, schedule="1f1b",
                           devices=["/cpu:1", "/cpu:2"])
    assert type(pipe.executor.loops).__name__ == "SteadyLoop"
    with pipe._attached():  # noqa: SLF001 (tests only): the hooks fit installs
        step = tf.function(lambda a, b: pipe.executor.train_step((a, b)), autograph=False)
        with pipe.executor.glue_options():
            sent = placed_transfers(step, tf.constant(x), tf.constant(y))
    host = canonical(HOST)
    to_loops = [t for t in sent if t.source == host and "while" in t.tensor + "".join(t.readers)]
    assert to_loops == [], to_loops
    from_loops = [t for t in sent if t.target == host and "while" in t.tensor]
    assert from_loops and all("/exit/" in t.tensor for t in from_loops), from_loops
