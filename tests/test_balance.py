"""Balancing: the solver is optimal, profiling finds a heavy layer, the summary reports it."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import tfpipe
from tests.models import StepLog, assert_same_training
from tfpipe.balance import solve

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from char_model import Block, TokenAndPosition  # noqa: E402


def brute_force(costs, parts):
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), parts - 1):
        bounds = (0,) + cuts + (len(costs),)
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("costs,parts,expected", [
    ([1, 1, 1, 1, 4], 2, [4, 1]),
    ([4, 1, 1, 1, 1], 2, [1, 4]),
    ([5, 5, 5, 5], 4, [1, 1, 1, 1]),
    ([1, 2, 3, 4, 5, 6], 3, [3, 2, 1]),  # 6 | 9 | 6 -> largest 9, no split does better
    ([0, 0, 10, 0, 0], 3, [2, 1, 2]),     # cost-free layers spread around the heavy one
])
def test_solver_on_hand_made_costs(costs, parts, expected):
    sizes = solve(costs, parts)
    assert sizes == expected
    assert max(sum(costs[sum(sizes[:i]):sum(sizes[:i + 1])]) for i in range(parts)) == brute_force(costs, parts)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=9), st.integers(1, 5))
def test_solver_is_optimal(costs, parts):
    parts = min(parts, len(costs))
    sizes = solve(costs, parts)
    assert len(sizes) == parts and all(s >= 1 for s in sizes) and sum(sizes) == len(costs)
    bounds = np.cumsum([0] + sizes)
    worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
    assert worst == brute_force(costs, parts)


@keras.saving.register_keras_serializable(package="tfpipe_tests")
class Heavy(keras.layers.Layer):
    """No parameters, much compute: 60 chained products with a fixed matrix."""

    def call(self, x):
        m = keras.ops.eye(x.shape[-1]) * 0.5
        for _ in range(60):
            x = keras.ops.tanh(keras.ops.matmul(x, m) + x)
        return x


def heavy_model():
    return keras.Sequential(
        [keras.Input((64,))]
        + [keras.layers.Dense(64, activation="relu", name=f"pre{i}") for i in range(3)]
        + [Heavy(name="heavy")]
        + [keras.layers.Dense(64, activation="relu", name=f"post{i}") for i in range(3)],
        name="heavy_model",
    )


def test_by_time_puts_the_heavy_layer_alone():
    model = heavy_model()
    model.compile("sgd", "mse")
    sample = np.random.default_rng(0).normal(size=(512, 64)).astype("float32")
    sizes = tfpipe.balance.by_time(model, sample, stages=3)
    names = [layer.name for layer in model.layers]
    bounds = np.cumsum([0] + sizes)
    groups = [names[a:b] for a, b in zip(bounds, bounds[1:])]
    assert ["heavy"] in groups, groups
    # by parameters the heavy layer costs nothing and is not alone
    by_params = tfpipe.balance.by_params(model, 3)
    bounds = np.cumsum([0] + by_params)
    assert ["heavy"] not in [names[a:b] for a, b in zip(bounds, bounds[1:])]


def test_balance_time_and_memory_in_pipeline_and_summary():
    model = heavy_model()
    model.compile("sgd", "mse")
    x = np.random.default_rng(0).normal(size=(512, 64)).astype("float32")
    pipe = tfpipe.Pipeline(model, stages=3, balance="time", sample=x)
    text = pipe.summary(print_fn=lambda s: None)
    assert "balanced by time" in text and "time ms" in text and "imbalance" in text
    assert any([layer.name for layer in s.layers] == ["heavy"] for s in pipe.stages)
    model2 = heavy_model()
    model2.compile("adam", "mse")
    sizes = tfpipe.balance.by_memory(model2, x, 2)
    assert sum(sizes) == 7 and len(sizes) == 2
    with pytest.raises(tfpipe.PipelineError, match=r"balance='time' profiles each layer.*sample="):
        tfpipe.Pipeline(model2, stages=2, balance="time")


def test_fit_with_balance_time_equals_keras():
    x = np.random.default_rng(0).normal(size=(64, 64)).astype("float32")
    y = np.random.default_rng(1).normal(size=(64, 64)).astype("float32")

    def make():
        keras.utils.set_random_seed(0)
        model = heavy_model()
        model.compile(keras.optimizers.SGD(0.01), "mse")
        return model

    ref, ref_log = make(), StepLog()
    ref.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = make(), StepLog()
    tfpipe.fit(model, x, y, batch_size=16, stages=3, balance="time", micro_batches=2,
               shuffle=False, verbose=0, callbacks=[log])
    assert_same_training(ref, ref_log, model, log)


def test_transformer_classifier_with_custom_blocks_equals_keras():
    def make():
        keras.utils.set_random_seed(0)
        ids = keras.Input((12,), dtype="int32")
        h = TokenAndPosition(30, 12, 16, name="embed")(ids)
        h = Block(16, 2, 32, name="block_0")(h)
        h = Block(16, 2, 32, name="block_1")(h)
        h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
        out = keras.layers.Dense(3, activation="softmax", name="head")(h)
        model = keras.Model(ids, out, name="transformer_classifier")
        # SGD: the attention key bias has a zero true gradient (softmax ignores it), and Adam
        # would turn its float32 noise into full-size steps that differ run to run.
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        return model

    rng = np.random.default_rng(0)
    x = rng.integers(0, 30, size=(48, 12)).astype("int32")
    y = rng.integers(0, 3, size=48)
    ref, ref_log = make(), StepLog()
    ref.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = make(), StepLog()
    pipe = tfpipe.Pipeline(model, split_points=["block_0", "block_1", "pool"], micro_batches=4,
                           schedule="1f1b")
    pipe.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[log])
    assert_same_training(ref, ref_log, model, log)


def test_profiling_times_a_copy_whose_weights_sit_on_the_target_device():
    """A layer built on one device and profiled on another is timed as a copy with its
    weights on the target (as the pipeline will hold them), not reading them across."""
    from tfpipe.measure import local_copy as _local_copy

    with tf.device("/device:CPU:0"):
        layer = keras.layers.Dense(4)
        x = tf.ones((2, 3))
        layer(x)
    copy = _local_copy(layer, (x,), {}, "/device:CPU:1")
    assert copy is not layer
    assert all(v.value.device.endswith("CPU:1") for v in copy.weights)
    assert all(v.value.device.endswith("CPU:0") for v in layer.weights)
    for a, b in zip(copy.get_weights(), layer.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert _local_copy(layer, (x,), {}, "/device:CPU:0") is layer
