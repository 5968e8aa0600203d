"""Bad input gets a clear error naming the value and the fix, and leaves the model untouched."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpipe
from tests.models import build, data
from tfpipe.placement import device_of


def devices_of(model):
    return [device_of(v) for v in model.weights]


def test_more_stages_than_layers():
    model = build("mlp")
    before = devices_of(model)
    with pytest.raises(tfpipe.PipelineError, match=r"stages=6 is more than the 4 layer calls.*use stages <= 4"):
        tfpipe.Pipeline(model, stages=6, devices=["/cpu:0"])
    assert devices_of(model) == before


def test_balance_not_summing_to_layer_count():
    model = build("mlp")
    with pytest.raises(tfpipe.PipelineError, match=r"balance=\[1, 1\] .* summing to the model's 4 layer calls.*sums to 2"):
        tfpipe.Pipeline(model, balance=[1, 1])


def test_balance_and_stages_disagree():
    with pytest.raises(tfpipe.PipelineError, match=r"stages=3 with chunks=1 makes 3 stages, but balance/split_points give 2"):
        tfpipe.Pipeline(build("mlp"), stages=3, balance=[2, 2])


def test_model_not_compiled_predicts_but_does_not_train():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    x = np.ones((8, 4), "float32")
    pipe = tfpipe.Pipeline(model, stages=2, micro_batches=2)
    np.testing.assert_allclose(pipe.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    with pytest.raises(tfpipe.PipelineError, match=r"not compiled: call model.compile.*before fit"):
        pipe.fit(x, np.ones((8, 2), "float32"))
    with pytest.raises(tfpipe.PipelineError, match=r"before evaluate"):
        pipe.evaluate(x, np.ones((8, 2), "float32"))


def test_fewer_devices_than_stages():
    model = build("mlp")
    before = devices_of(model)
    with pytest.raises(tfpipe.PipelineError, match=r"stages=4 needs 4 devices but only 2|configure_cpu_devices"):
        tfpipe.devices.resolve_devices(None, 8)
    with pytest.raises(tfpipe.PipelineError, match=r"needs 8 devices but only 4 are visible.*configure_cpu_devices\(8\).*devices=\[\.\.\.\]"):
        tfpipe.Pipeline(model, balance=[1, 1, 1, 1, 0, 0, 0, 0][:4] * 2)
    assert devices_of(model) == before


def test_device_that_does_not_exist():
    with pytest.raises(tfpipe.PipelineError, match=r"Device '/cpu:9' does not exist; visible devices are"):
        tfpipe.Pipeline(build("mlp"), stages=2, devices=["/cpu:0", "/cpu:9"])


def test_logical_devices_after_tensorflow_initialised():
    tf.constant(1.0)
    with pytest.raises(tfpipe.DeviceConfigurationError, match=r"configure_cpu_devices\(8\) was called after TensorFlow initialised with 4.*top of the script"):
        tfpipe.configure_cpu_devices(8)
    assert tfpipe.configure_cpu_devices(4) == [f"/device:CPU:{i}" for i in range(4)]


def test_unknown_schedule():
    with pytest.raises(ValueError, match=r"Unknown schedule 'pipedream'.*use one of"):
        tfpipe.Pipeline(build("mlp"), stages=2, schedule="pipedream")


def test_bad_micro_batches():
    with pytest.raises(tfpipe.PipelineError, match=r"micro_batches must be a positive integer.*got 0"):
        tfpipe.Pipeline(build("mlp"), stages=2, micro_batches=0)


def test_batch_smaller_than_micro_batches():
    model = build("mlp")
    x, y = data("mlp", n=20)
    with pytest.raises(tfpipe.PipelineError, match=r"a batch of 4 samples is smaller than micro_batches=8"):
        tfpipe.fit(model, x, y, batch_size=16, stages=2, micro_batches=8, verbose=0)


def test_subclassed_model_needs_a_sample_to_split():
    class Opaque(keras.Model):
        def __init__(self):
            super().__init__()
            self.d1, self.d2 = keras.layers.Dense(4), keras.layers.Dense(2)

        def call(self, x):
            return self.d2(self.d1(x))

    model = Opaque()
    model.compile("sgd", "mse")
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(tfpipe.PipelineError, match=r"subclassed model .* \(Opaque\) by tracing.*pass sample=.*stages=1"):
        tfpipe.Pipeline(model, stages=2)
    assert len(tfpipe.Pipeline(model, stages=2, sample=np.zeros((2, 3), "float32")).stages) == 2
    pipe = tfpipe.Pipeline(model, stages=1)  # whole model on one device needs no tracing
    pipe.fit(np.ones((8, 3), "float32"), np.ones((8, 2), "float32"), batch_size=4, verbose=0)


def test_unbuilt_sequential_is_built_from_the_data():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data("mlp")
    with pytest.raises(tfpipe.PipelineError, match=r"not built"):
        tfpipe.Pipeline(model, stages=2)
    tfpipe.fit(model, x, y, batch_size=16, stages=2, verbose=0)
    assert model.built
