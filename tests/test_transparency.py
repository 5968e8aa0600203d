"""Pipelined training equals plain `model.fit`: per-step losses, metrics and final weights."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf

import tfpipe
from tests.models import StepLog, assert_same_training, build, data

_REFERENCE: dict = {}


def reference(kind: str, opt: str, **fit_kwargs):
    """Plain model.fit on one device (cached per model kind and optimizer)."""
    key = (kind, opt, tuple(sorted(fit_kwargs.items())))
    if key not in _REFERENCE:
        model = build(kind, opt)
        x, y = data(kind)
        log = StepLog()
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[log],
                  **fit_kwargs)
        _REFERENCE[key] = (model, log)
    return _REFERENCE[key]


# A covering design rather than the full 3 x 2 x 3 x 4 product (72 fits): every model kind
# and optimizer meets every micro-batch count once and every stage count at least once, and
# every (stages, micro-batches) pair occurs twice, with two kinds. Row i of the 6 (kind,
# optimizer) rows takes M = 1, 2, 4, 8 with K = 1, 2, 4 rotated by i.
GRID = [
    (kind, opt, [1, 2, 4][(i + j) % 3], m)
    for i, (kind, opt) in enumerate(itertools.product(["mlp", "cnn", "functional"],
                                                      ["sgd", "adam"]))
    for j, m in enumerate([1, 2, 4, 8])
]


def test_grid_covers_every_pair():
    kinds = {(k, o) for k, o, _, _ in GRID}
    assert len(GRID) == 24 and len(kinds) == 6
    for pair in itertools.product([1, 2, 4], [1, 2, 4, 8]):
        assert sum((s, m) == pair for _, _, s, m in GRID) == 2, pair
    for k, o in kinds:
        rows = [(s, m) for kk, oo, s, m in GRID if (kk, oo) == (k, o)]
        assert sorted(m for _, m in rows) == [1, 2, 4, 8] and {s for s, _ in rows} == {1, 2, 4}


@pytest.mark.parametrize("kind,opt,stages,micro_batches", GRID)
def test_fit_equals_keras(kind, opt, stages, micro_batches):
    ref_model, ref_log = reference(kind, opt)
    model = build(kind, opt)
    x, y = data(kind)
    log = StepLog()
    history = tfpipe.fit(model, x, y, batch_size=16, epochs=2, stages=stages,
                         micro_batches=micro_batches, shuffle=False, verbose=0, callbacks=[log])
    assert set(history.history) == {"loss", "accuracy"}
    assert_same_training(ref_model, ref_log, model, log)


def test_sample_weights_dataset_equals_keras():
    x, y = data("mlp")
    w = np.random.default_rng(3).uniform(0.1, 2.0, size=len(x)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(16)
    ref = build("mlp", "adam", weighted_metrics=["accuracy"])
    ref_log = StepLog()
    ref.fit(ds, epochs=2, verbose=0, callbacks=[ref_log])
    model = build("mlp", "adam", weighted_metrics=["accuracy"])
    log = StepLog()
    tfpipe.fit(model, ds, epochs=2, stages=4, micro_batches=4, verbose=0, callbacks=[log])
    assert_same_training(ref, ref_log, model, log)


@pytest.mark.parametrize("reduction", ["sum", "mean_with_sample_weight"])
def test_other_loss_reductions_equal_keras(reduction):
    import keras

    x, y = data("mlp")
    w = np.random.default_rng(4).uniform(0.1, 2.0, size=len(x)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(16)

    def make():
        return build("mlp", "sgd", loss=keras.losses.SparseCategoricalCrossentropy(reduction=reduction))

    ref, ref_log = make(), StepLog()
    ref.fit(ds, epochs=1, verbose=0, callbacks=[ref_log])
    model, log = make(), StepLog()
    tfpipe.fit(model, ds, epochs=1, stages=2, micro_batches=4, verbose=0, callbacks=[log])
    assert_same_training(ref, ref_log, model, log)


def test_uneven_micro_batches_and_short_last_batch():
    """70 samples, batch 16 -> a last batch of 6; 3 micro-batches never divide evenly."""
    x, y = data("mlp", n=70)
    ref, ref_log = build("mlp", "adam"), StepLog()
    ref.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = build("mlp", "adam"), StepLog()
    pipe = tfpipe.Pipeline(model, stages=4, micro_batches=3)
    pipe.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[log])
    assert_same_training(ref, ref_log, model, log)
    # one trace for full batches, at most one more for the short last batch; not one per batch
    assert pipe.executor.traces["train"] <= 2


def test_regularizers_equal_keras():
    import keras

    def make():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", kernel_regularizer=keras.regularizers.L2(0.01)),
            keras.layers.Dense(16, activation="relu", activity_regularizer=keras.regularizers.L1(0.01)),
            keras.layers.Dense(3, activation="softmax", kernel_regularizer=keras.regularizers.L1(0.01)),
        ])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
        return model

    x, y = data("mlp", n=48)
    ref, ref_log = make(), StepLog()
    ref.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = make(), StepLog()
    tfpipe.fit(model, x, y, batch_size=16, epochs=2, stages=3, micro_batches=4, shuffle=False,
               verbose=0, callbacks=[log])
    assert_same_training(ref, ref_log, model, log)


def test_evaluate_predict_and_validation_equal_keras():
    x, y = data("functional")
    xv, yv = data("functional", n=40, seed=7)
    ref = build("functional", "adam")
    h_ref = ref.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, validation_data=(xv, yv))
    model = build("functional", "adam")
    pipe = tfpipe.Pipeline(model, stages=3, micro_batches=4)
    h = pipe.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, validation_data=(xv, yv))
    for k in ("val_loss", "val_accuracy", "loss"):
        np.testing.assert_allclose(h.history[k], h_ref.history[k], rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(pipe.evaluate(xv, yv, batch_size=8, verbose=0),
                               ref.evaluate(xv, yv, batch_size=8, verbose=0), rtol=1e-5)
    np.testing.assert_allclose(pipe.predict(xv, batch_size=10, verbose=0),
                               ref.predict(xv, batch_size=10, verbose=0), rtol=1e-5, atol=1e-7)
    assert pipe.executor.traces["test"] >= 1 and pipe.executor.traces["predict"] >= 1


def test_explicit_devices_fewer_than_stages_equal_keras():
    x, y = data("mlp")
    ref_model, ref_log = reference("mlp", "adam")
    model, log = build("mlp", "adam"), StepLog()
    pipe = tfpipe.Pipeline(model, stages=4, micro_batches=2, devices=["/cpu:0", "/cpu:1"])
    assert [s.device for s in pipe.stages] == ["/device:CPU:0", "/device:CPU:0",
                                               "/device:CPU:1", "/device:CPU:1"]
    pipe.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[log])
    assert_same_training(ref_model, ref_log, model, log)


def test_step_traces_as_often_as_keras_and_never_per_batch():
    """Keras traces its step a fixed number of times per fit; tfpipe's step traces no more, and
    not again for more epochs or a second fit."""
    x, y = data("mlp")
    plain = build("mlp", "adam")
    plain_traces = []
    step = plain.train_step
    plain.train_step = lambda batch: (plain_traces.append(1), step(batch))[1]
    plain.fit(x, y, batch_size=16, epochs=3, verbose=0)
    model = build("mlp", "adam")
    pipe = tfpipe.Pipeline(model, stages=4, micro_batches=4)
    pipe.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert pipe.executor.traces["train"] == len(plain_traces) <= 2
    pipe.fit(x, y, batch_size=16, epochs=2, verbose=0)  # a second fit reuses the traced step
    assert pipe.executor.traces["train"] == len(plain_traces)


def test_top_level_evaluate_and_predict_equal_keras():
    x, y = data("cnn")
    ref, model = build("cnn", "adam"), build("cnn", "adam")
    np.testing.assert_allclose(tfpipe.evaluate(model, x, y, stages=3, micro_batches=2, verbose=0),
                               ref.evaluate(x, y, verbose=0), rtol=1e-5)
    np.testing.assert_allclose(tfpipe.predict(model, x, stages=3, micro_batches=2, verbose=0),
                               ref.predict(x, verbose=0), rtol=1e-5, atol=1e-7)
