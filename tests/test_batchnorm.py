"""Deferred BatchNormalization (`batch_norm="deferred"`): moving statistics equal one full-batch
`model.fit` step, while each micro-batch is still normalised by its own statistics."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tfpipe

RNG = np.random.default_rng(3)
X = (RNG.normal(size=(64, 8)) * 3 + 1).astype("float32")
Y = RNG.integers(0, 3, size=64)


def two_norms() -> keras.Model:
    """Two BatchNormalizations (in different stages) whose inputs pass through no other one,
    so a full-batch step and a deferred pipelined one see the same inputs."""
    inputs = keras.Input((8,))
    a = keras.layers.BatchNormalization(momentum=0.9, name="bn_a")(
        keras.layers.Dense(12, name="d_a")(inputs))
    b = keras.layers.Dense(12, name="d_b")(inputs)
    b = keras.layers.BatchNormalization(momentum=0.8, name="bn_b")(b)
    h = keras.layers.Concatenate(name="cat")([a, b])
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(h))


def make() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = two_norms()
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    return model


def moving(model: keras.Model) -> dict[str, np.ndarray]:
    return {v.path: v.numpy() for v in model.non_trainable_weights}


@pytest.mark.parametrize("schedule,recompute", [("1f1b", "never"), ("gpipe", "always")])
def test_deferred_moving_statistics_equal_a_full_batch_step(schedule, recompute):
    ref = make()
    ref.fit(X, Y, batch_size=64, epochs=1, shuffle=False, verbose=0)  # one full-batch step
    deferred, per_micro_batch = make(), make()
    for model, mode in ((deferred, "deferred"), (per_micro_batch, "micro-batch")):
        tfpipe.fit(model, X, Y, batch_size=64, epochs=1, shuffle=False, verbose=0,
                   split_points=["d_b", "cat"], micro_batches=4, schedule=schedule,
                   recompute=recompute, batch_norm=mode)
    want, got, per_mb = moving(ref), moving(deferred), moving(per_micro_batch)
    assert len(want) == 4
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)
    # Keras's own per-micro-batch updates give other statistics: the test can tell them apart
    assert any(not np.allclose(per_mb[p], want[p], rtol=1e-3) for p in want)
    # each micro-batch is still normalised by its own statistics: the weights differ from
    # the full-batch step's, exactly as with batch_norm="micro-batch"
    for a, b in zip(deferred.trainable_weights, per_micro_batch.trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_deferred_refuses_renorm():
    inputs = keras.Input((8,))
    h = keras.layers.Dense(4)(inputs)
    h = keras.layers.BatchNormalization(renorm=True, name="renormed")(h)
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    model.compile("sgd", "mse")
    with pytest.raises(tfpipe.PipelineError, match=r"cannot defer BatchNormalization 'renormed'.*renorm=True"):
        tfpipe.Pipeline(model, stages=2, batch_norm="deferred")
