"""Optimizers, clipping and mixed precision behave exactly as in plain `model.fit`."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tfpipe
from tests.models import MODELS, StepLog, assert_same_training, data, low_precision_tolerance
from tfpipe.placement import device_of

opts = keras.optimizers


def run_both(make_optimizer, policy=None, stages=4, micro_batches=4, **tolerance):
    x, y = data("mlp")
    runs = []
    for pipelined in (False, True):
        keras.mixed_precision.set_global_policy(policy or "float32")
        try:
            keras.utils.set_random_seed(0)
            model = MODELS["mlp"]()
            model.compile(optimizer=make_optimizer(), loss="sparse_categorical_crossentropy",
                          metrics=["accuracy"])
            log = StepLog()
            kwargs = dict(batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[log])
            if pipelined:
                tfpipe.fit(model, x, y, stages=stages, micro_batches=micro_batches, **kwargs)
            else:
                model.fit(x, y, **kwargs)
            runs.append((model, log))
        finally:
            keras.mixed_precision.set_global_policy("float32")
    (ref, ref_log), (model, log) = runs
    assert_same_training(ref, ref_log, model, log, **tolerance)
    return ref, model


OPTIMIZERS = {
    "sgd_nesterov": lambda: opts.SGD(0.1, momentum=0.9, nesterov=True),
    "adamw": lambda: opts.AdamW(0.01, weight_decay=0.1),
    "lr_schedule": lambda: opts.Adam(opts.schedules.ExponentialDecay(0.01, decay_steps=2, decay_rate=0.5)),
    "ema": lambda: opts.Adam(0.01, use_ema=True, ema_overwrite_frequency=3),
    "grad_accumulation": lambda: opts.Adam(0.01, gradient_accumulation_steps=2),
    "global_clipnorm": lambda: opts.SGD(0.5, global_clipnorm=0.01),
    "clipnorm": lambda: opts.SGD(0.5, clipnorm=0.01),
    "clipvalue": lambda: opts.SGD(0.5, clipvalue=0.0005),
    **{name.lower(): getattr(opts, name) for name in
       ("RMSprop", "Adagrad", "Adadelta", "Adamax", "Nadam", "Ftrl", "Lion", "Lamb")
       if hasattr(opts, name)},
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_equals_keras(name):
    run_both(OPTIMIZERS[name])


def test_global_clipnorm_really_clips_across_stages():
    """The clip must see all stages' gradients at once: per-stage clipping would differ."""
    ref, model = run_both(lambda: opts.SGD(1.0, global_clipnorm=1e-3))
    unclipped, _ = run_both(lambda: opts.SGD(1.0))
    moved = [np.abs(a.numpy() - b.numpy()).max() for a, b in zip(ref.weights, unclipped.weights)]
    assert max(moved) > 1e-2  # the clipped and unclipped runs really differ


def test_mixed_float16_equals_keras_and_keeps_updates_on_stage_devices():
    ref, model = run_both(lambda: opts.Adam(0.01), policy="mixed_float16",
                          **low_precision_tolerance("mixed_float16"))
    assert isinstance(model.optimizer, opts.LossScaleOptimizer)
    for layer in model.layers:
        for slot in model.optimizer.inner_optimizer.variables:
            if layer.kernel.path.replace("/", "_") in slot.path:
                assert device_of(slot) == device_of(layer.kernel), slot.path


def test_mixed_bfloat16_equals_keras():
    run_both(lambda: opts.SGD(0.1), policy="mixed_bfloat16",
             **low_precision_tolerance("mixed_bfloat16"))


def test_fp16_overflow_skips_the_step_on_every_stage_and_lowers_the_scale():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = MODELS["mlp"]()
        model.compile(optimizer=opts.LossScaleOptimizer(opts.SGD(0.1), initial_scale=2.0 ** 60),
                      loss="sparse_categorical_crossentropy")
        x, y = data("mlp", n=16)
        before = [v.numpy().copy() for v in model.trainable_variables]
        pipe = tfpipe.Pipeline(model, stages=4, micro_batches=2)
        pipe.fit(x, y, batch_size=16, epochs=1, verbose=0)
        for a, v in zip(before, model.trainable_variables):  # no stage moved
            np.testing.assert_array_equal(v.numpy(), a, err_msg=v.path)
        assert float(model.optimizer.dynamic_scale.numpy()) == 2.0 ** 59
    finally:
        keras.mixed_precision.set_global_policy("float32")
