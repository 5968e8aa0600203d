"""Gradient memory does not grow with the number of micro-batches: each stage adds one
micro-batch's weight gradients to its running sum at a time (`program.gradient_waits`).

Before the chain, GPipe's dataflow computed every micro-batch's gradients before adding
any: a 1-stage step peaked at 6x the weights at M = 4 with SGD (weights, 4 gradients, the
sum); now 4x at any M (weights, the sum, one micro-batch's gradients, the new sum).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tfpipe
from tfpipe import allocator


def step_peak(micro_batches: int, schedule: str) -> tuple[float, float]:
    """A training step's allocator peak on CPU:0, in units of the model's weight bytes."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((256,))]
                             + [keras.layers.Dense(1024, activation="relu") for _ in range(4)]
                             + [keras.layers.Dense(10)])
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 256), dtype=np.float32), rng.integers(0, 10, 64)
    weights = sum(int(np.prod(v.shape)) * 4 for v in model.weights)
    pipe = tfpipe.Pipeline(model, devices=["/device:CPU:0"], stages=1,
                           micro_batches=micro_batches, schedule=schedule)
    pipe.fit(x[:32], y[:32], batch_size=32, verbose=0)  # traces, places
    held = allocator.current_bytes("CPU:0")
    allocator.reset("CPU:0")
    pipe.fit(x[32:], y[32:], batch_size=32, verbose=0)
    return (allocator.peak_bytes("CPU:0") - held) / weights, weights


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_step_peak_does_not_grow_with_micro_batches(schedule):
    reason = allocator.unavailable("CPU:0")
    if reason is not None:
        pytest.skip(reason=reason)
    two, _ = step_peak(2, schedule)
    eight, _ = step_peak(8, schedule)
    # above what the step holds: the sum, a micro-batch's gradients and the new sum (3x),
    # plus small activations; M = 8 without the chain held 8 gradients at once (9x)
    assert eight < 3.5, eight
    assert eight - two < 0.5, (two, eight)
