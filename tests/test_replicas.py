"""Pipeline x data parallel: R copies of the pipeline, gradients summed per stage onto copy 0,
trained exactly like plain `model.fit` on the full batch."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpipe
from tests.models import StepLog, assert_same_training, build, data
from tfpipe.executor.replicas import communication_hint, packs
from tfpipe.placement import device_of

CPUS = [f"/device:CPU:{i}" for i in range(4)]


def tokens_model() -> keras.Model:
    """Token ids -> embedding (IndexedSlices gradients) -> dense head."""
    tokens = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(20, 8, name="embed")(tokens)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = keras.layers.Dense(8, activation="tanh", name="d1")(h)
    return keras.Model(tokens, keras.layers.Dense(3, activation="softmax", name="head")(h))


def make(kind, optimizer):
    if kind != "tokens":
        return build(kind, optimizer)
    keras.utils.set_random_seed(0)
    model = tokens_model()
    model.compile(keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def fit_both(kind, pipe_kwargs, optimizer="adam", epochs=2, n=64, batch=16):
    x, y = data("mlp" if kind == "tokens" else kind, n=n)
    if kind == "tokens":
        x = np.random.default_rng(2).integers(0, 20, size=(n, 6)).astype("int32")
    return fit_pair(lambda: make(kind, optimizer), x, y, pipe_kwargs, epochs, batch)


def fit_pair(factory, x, y, pipe_kwargs, epochs=2, batch=16):
    """`model.fit` and a pipeline's fit of two models from `factory`, checked equal."""
    ref, ref_log = factory(), StepLog()
    ref.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = factory(), StepLog()
    pipe = tfpipe.Pipeline(model, **pipe_kwargs)
    pipe.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, callbacks=[log])
    assert_same_training(ref, ref_log, model, log, batch_size=batch)
    return pipe, model


@pytest.mark.parametrize("schedule,micro_batches", [("gpipe", 2), ("1f1b", 4), ("zb-h1", 2)])
def test_two_replicas_of_a_two_stage_pipeline_equal_model_fit(schedule, micro_batches):
    pipe, model = fit_both("mlp", dict(stages=2, replicas=2, devices=CPUS,
                                       micro_batches=micro_batches, schedule=schedule))
    assert pipe.replica_devices == [CPUS[:2], CPUS[2:]]
    # one set of variables, on copy 0's devices
    assert {device_of(v) for v in pipe.stages[0].model.weights} == {CPUS[0]}
    assert {device_of(v) for v in pipe.stages[1].model.weights} == {CPUS[1]}
    # copy 1 computed on its own devices, and its gradient sums were added to copy 0's on
    # copy 0's devices: one add per variable, no all-reduce (whose second result nobody read)
    produced = pipe.executor.produced
    m = micro_batches  # copy 1's first micro-batch
    first_forward = produced[tfpipe.schedules.Action(0, "F", m)][0]
    assert first_forward.device == CPUS[2]
    graph = first_forward.graph
    assert not [op for op in graph.get_operations() if op.type.startswith("Collective")]
    for k, stage in enumerate(pipe.stages):
        adds = [op for op in graph.get_operations()
                if op.name.startswith(f"stage{k}_reduce/") and op.type in ("AddV2", "Add")]
        assert len(adds) == len(stage.trainable_variables)
        assert {op.device for op in adds} == {CPUS[k]}
        assert all(op.outputs[0].consumers() for op in adds)  # the sums feed the step
        assert {op.inputs[1].device for op in adds} == {CPUS[2 + k]}  # copy 1's sums


def test_replicas_with_recompute_and_interleaved_schedule():
    fit_both("mlp", dict(stages=2, replicas=2, devices=CPUS, micro_batches=2,
                         recompute="except_last"), optimizer="sgd")
    fit_both("deep", dict(stages=1, chunks=2, schedule="interleaved", replicas=2,
                          devices=CPUS[:2], micro_batches=2), optimizer="sgd")


def test_four_replicas_of_one_stage_is_plain_data_parallel():
    pipe, _ = fit_both("functional", dict(stages=1, replicas=4, devices=CPUS, micro_batches=1))
    # one all-reduce per device of the stage's packed gradients, not one per variable
    graph = pipe.executor.produced[tfpipe.schedules.Action(0, "F", 0)][0].graph
    reduces = [op for op in graph.get_operations() if op.type == "CollectiveReduceV2"]
    assert len(pipe.stages[0].trainable_variables) > 1
    assert sorted(op.device for op in reduces) == CPUS
    assert {op.get_attr("communication_hint") for op in reduces} == {b"auto"}


def test_collectives_use_nccl_only_when_every_device_is_a_gpu_of_its_own():
    gpus = ["/device:GPU:0", "/job:worker/replica:0/task:1/device:GPU:0", "/gpu:1"]
    assert communication_hint(gpus, split_gpus=False) == "nccl"
    assert communication_hint(gpus, split_gpus=True) == "auto"  # NCCL: one rank per GPU
    workers = [f"/job:worker/replica:0/task:{i}/device:GPU:0" for i in range(3)]
    assert communication_hint(workers) == "nccl"  # a worker's GPUs are taken to be whole
    assert communication_hint([*workers, "/job:worker/replica:0/task:3/device:CPU:0"]) == "auto"
    assert communication_hint(CPUS) == "auto"


def test_packs_group_consecutive_tensors_of_one_dtype_up_to_a_size():
    f32, f16 = tf.float32, tf.float16
    assert packs([(4, f32), (2, f32), (8, f32)], limit=24) == [[0, 1], [2]]
    assert packs([(4, f32), (4, f16), (2, f32)], limit=1024) == [[0, 2], [1]]
    assert packs([(100, f32), (1, f32)], limit=16) == [[0], [1]]  # a large one alone
    assert packs([]) == []


def test_replicas_with_embedding_gradients_and_uneven_batches():
    """Sparse (IndexedSlices) gradients are gathered in replica order; 60 = 3 full batches of
    16 and one of 12, split into 2 x 2 micro-batches."""
    fit_both("tokens", dict(stages=2, replicas=2, devices=CPUS, micro_batches=2,
                               schedule="1f1b"), n=60)


def test_replicas_through_tfpipe_fit_evaluate_and_predict():
    x, y = data("mlp", n=64)
    ref = build("mlp")
    ref_hist = ref.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    model = build("mlp")
    hist = tfpipe.fit(model, x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                      stages=2, replicas=2, micro_batches=2, devices=CPUS)
    np.testing.assert_allclose(hist.history["loss"], ref_hist.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(hist.pipeline.predict(x, verbose=0), ref.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hist.pipeline.evaluate(x, y, verbose=0),
                               ref.evaluate(x, y, verbose=0), rtol=1e-5)
    assert "2 replicas" in hist.pipeline.summary(print_fn=lambda s: None)


def test_replicas_need_one_device_per_stage_per_copy():
    with pytest.raises(tfpipe.PipelineError, match=r"replicas=2 copies of a 2-device pipeline need 4"):
        tfpipe.Pipeline(build("mlp"), stages=2, replicas=2, devices=CPUS[:3])
    with pytest.raises(tfpipe.PipelineError, match=r"replicas must be a positive integer"):
        tfpipe.Pipeline(build("mlp"), stages=2, replicas=0)


class TiedLogits(keras.layers.Layer):
    """Logits from the transposed embedding table: the table is read by the first and the
    last stage (tied weights)."""

    def __init__(self, embedding, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding

    def call(self, h):
        return keras.ops.matmul(h, keras.ops.transpose(self.embedding.embeddings))


def tied_lm() -> keras.Model:
    keras.utils.set_random_seed(0)
    tokens = keras.Input((5,), dtype="int32")
    embed = keras.layers.Embedding(12, 6, name="embed")
    h = keras.layers.Dense(6, activation="tanh", name="d1")(embed(tokens))
    h = keras.layers.Dense(6, activation="tanh", name="d2")(h)
    model = keras.Model(tokens, TiedLogits(embed, name="tied_logits")(h))
    model.compile(keras.optimizers.Adam(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("schedule,recompute", [("1f1b", "never"), ("zb-h1", "always")])
def test_replicas_with_a_tied_embedding(schedule, recompute):
    """Each copy reads the tied table once per stage that uses it; stage 0's sparse gradient
    and the last stage's dense one are summed over copies, then over uses, on the owner."""
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, 12, size=(64, 5)).astype("int32"), rng.integers(0, 12, size=(64, 5))
    pipe, model = fit_pair(tied_lm, x, y, dict(balance=[2, 2], replicas=2, devices=CPUS,
                                               micro_batches=2, schedule=schedule,
                                               recompute=recompute))
    table = model.get_layer("embed").embeddings
    assert pipe.stages[-1].shared_from == {id(table): 0}
    assert device_of(table) == CPUS[0]


class Whole(keras.Model):
    """A subclassed model, trained whole as one (opaque) stage."""

    def __init__(self):
        super().__init__()
        self.d1 = keras.layers.Dense(16, activation="relu", kernel_regularizer="l2")
        self.d2 = keras.layers.Dense(3, activation="softmax")

    def call(self, x):
        return self.d2(self.d1(x))


def whole() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = Whole()
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model(np.zeros((1, 8), "float32"))
    return model


def test_replicas_of_an_opaque_model_and_with_check_numerics():
    """Neither is a stage function: the replica's weights reach the call through the same
    scope (`tfpipe.executor.weights.reading`), regularisers included."""
    x, y = data("mlp")
    fit_pair(whole, x, y, dict(stages=1, replicas=2, devices=CPUS[:2], micro_batches=2))
    fit_both("mlp", dict(stages=2, replicas=2, devices=CPUS, micro_batches=2,
                         check_numerics=True))


def noisy() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(12, activation="relu"),
        keras.layers.Dropout(0.3), keras.layers.BatchNormalization(),
        keras.layers.Dense(12, activation="relu", kernel_regularizer="l2"),
        keras.layers.Dropout(0.2), keras.layers.BatchNormalization(momentum=0.8),
        keras.layers.Dense(3, activation="softmax"),
    ])
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    return model


@pytest.mark.parametrize("schedule,recompute", [("gpipe", "never"), ("1f1b", "always")])
def test_replicas_advance_batchnorm_and_dropout_state_in_trace_order(schedule, recompute):
    """BatchNorm's moving statistics and Dropout's seed states stay the variables' own (on copy
    0's devices): each copy's calls read and advance them, micro-batch after micro-batch in
    the order the step traces the forwards, exactly as a plain Keras loop over the
    micro-batches in that order does (weights, statistics and seed states)."""
    x, y = data("mlp")
    model = noisy()
    pipe = tfpipe.Pipeline(model, stages=2, replicas=2, devices=CPUS, micro_batches=2,
                           schedule=schedule, recompute=recompute)
    orders = [[a.micro_batch for _, a in pipe.executor.program.runs
               if a.kind == "F" and a.stage == k] for k in range(2)]
    assert orders[0] == orders[1] and sorted(orders[0]) == [0, 1, 2, 3]
    pipe.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)

    ref = noisy()
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    for _ in range(2):
        for start in range(0, len(x), 16):
            xs = np.array_split(x[start:start + 16], 4)
            ys = np.array_split(y[start:start + 16], 4)
            grads = None
            for m in orders[0]:
                with tf.GradientTape() as tape:
                    loss = loss_fn(ys[m], ref(xs[m], training=True)) + tf.add_n(ref.losses)
                    loss = loss * (len(xs[m]) / 16)
                g = tape.gradient(loss, ref.trainable_variables)
                grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            ref.optimizer.apply_gradients(zip(grads, ref.trainable_variables))
    assert any("seed_generator" in v.path for v in model.variables)
    # the copies' gradient sums meet in another order than the loop's: BatchNorm's division
    # by the micro-batch spread carries that rounding to 6e-6 over 8 steps (another order of
    # micro-batches differs by 1e-2 and more)
    for a, b in zip(ref.variables, model.variables):  # statistics and seed states too
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=2e-5, err_msg=a.path)
