"""check_numerics names the stage, the layer and the pass; TerminateOnNaN works; results unchanged."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpipe
from tests.models import StepLog, assert_same_training, build, data


@keras.saving.register_keras_serializable(package="tfpipe_tests")
class LogOf(keras.layers.Layer):
    """log(x): NaN in the forward for negative inputs."""

    def call(self, x):
        return keras.ops.log(x)


@keras.saving.register_keras_serializable(package="tfpipe_tests")
class BadGrad(keras.layers.Layer):
    """Identity forward whose backward is NaN."""

    def call(self, x):
        @tf.custom_gradient
        def f(t):
            return tf.identity(t), lambda dy: dy * float("nan")
        return f(x)


def model_with(layer, index=2):
    layers = [keras.layers.Dense(8, activation="tanh", name=f"d{i}") for i in range(4)]
    layers.insert(index, layer)
    model = keras.Sequential([keras.Input((8,))] + layers + [keras.layers.Dense(3, name="head")])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_forward_nan_names_the_layer_and_stage():
    model = model_with(LogOf(name="log_layer"))
    x, y = data("mlp")
    with pytest.raises(tfpipe.PipelineError,
                       match=r"NaN or Inf in the forward of layer 'log_layer' \(stage 1, micro-batch 0\)"):
        tfpipe.fit(model, x, y, batch_size=16, balance=[2, 2, 2], micro_batches=2,
                   check_numerics=True, verbose=0)


def test_backward_nan_names_the_pass_and_layer():
    model = model_with(BadGrad(name="bad_grad"), index=3)
    x, y = data("mlp")
    with pytest.raises(tfpipe.PipelineError,
                       match=r"NaN or Inf in the backward: the gradient with respect to the output of layer 'd2' \(stage 1, micro-batch [01]\)"):
        tfpipe.fit(model, x, y, batch_size=16, balance=[2, 2, 2], micro_batches=2,
                   check_numerics=True, verbose=0)


def test_check_numerics_changes_nothing_when_finite():
    x, y = data("functional")
    ref, ref_log = build("functional", "adam"), StepLog()
    ref.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = build("functional", "adam"), StepLog()
    tfpipe.fit(model, x, y, batch_size=16, stages=3, micro_batches=4, check_numerics=True,
               schedule="zb-h1", recompute="always", shuffle=False, verbose=0, callbacks=[log])
    assert_same_training(ref, ref_log, model, log)


def test_terminate_on_nan_stops_training():
    model = model_with(LogOf(name="log_layer"))
    x, y = data("mlp")
    history = tfpipe.fit(model, x, y, batch_size=16, epochs=3, balance=[2, 2, 2], micro_batches=2,
                         verbose=0, callbacks=[keras.callbacks.TerminateOnNaN()])
    assert model.stop_training
    assert np.isnan(history.history["loss"][0]) and len(history.history["loss"]) == 1
