"""Pipeline x data parallel: R copies of the pipeline, gradients all-reduced per stage, trained
exactly like plain `model.fit` on the full batch."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tfpipe
from tests.models import StepLog, assert_same_training, build, data
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
    ref, ref_log = make(kind, optimizer), StepLog()
    ref.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = make(kind, optimizer), StepLog()
    pipe = tfpipe.Pipeline(model, **pipe_kwargs)
    pipe.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, callbacks=[log])
    assert_same_training(ref, ref_log, model, log)
    return pipe, model


@pytest.mark.parametrize("schedule,micro_batches", [("gpipe", 2), ("1f1b", 4), ("zb-h1", 2)])
def test_two_replicas_of_a_two_stage_pipeline_equal_model_fit(schedule, micro_batches):
    pipe, model = fit_both("mlp", dict(stages=2, replicas=2, devices=CPUS,
                                       micro_batches=micro_batches, schedule=schedule))
    assert pipe.replica_devices == [CPUS[:2], CPUS[2:]]
    # one set of variables, on copy 0's devices
    assert {device_of(v) for v in pipe.stages[0].model.weights} == {CPUS[0]}
    assert {device_of(v) for v in pipe.stages[1].model.weights} == {CPUS[1]}
    # copy 1 computed on its own devices, and the gradients met in collective all-reduces
    produced = pipe.executor.produced
    m = micro_batches  # copy 1's first micro-batch
    first_forward = produced[tfpipe.schedules.Action(0, "F", m)][0]
    assert first_forward.device == CPUS[2]
    graph = first_forward.graph
    reduces = [op for op in graph.get_operations() if op.type == "CollectiveReduceV2"]
    per_stage = {len(pipe.stages[k].trainable_variables) for k in range(2)}
    assert len(reduces) == 2 * sum(len(st.trainable_variables) for st in pipe.stages), per_stage
    assert {op.device for op in reduces} == set(CPUS)


def test_replicas_with_recompute_and_interleaved_schedule():
    fit_both("mlp", dict(stages=2, replicas=2, devices=CPUS, micro_batches=2,
                         recompute="except_last"), optimizer="sgd")
    fit_both("deep", dict(stages=1, chunks=2, schedule="interleaved", replicas=2,
                          devices=CPUS[:2], micro_batches=2), optimizer="sgd")


def test_four_replicas_of_one_stage_is_plain_data_parallel():
    fit_both("functional", dict(stages=1, replicas=4, devices=CPUS, micro_batches=1))


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
