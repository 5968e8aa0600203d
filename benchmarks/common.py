"""Shared pieces of the benchmarks: models, data, and side-by-side timing of Keras fits."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpipe import allocator


def mlp(width: int = 1024, depth: int = 8, classes: int = 10) -> keras.Model:
    """The peer benchmark's model: depth x Dense(width, relu) + Dense(classes)."""
    return keras.Sequential(
        [keras.Input((width,))]
        + [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
        + [keras.layers.Dense(classes)],
        name="mlp",
    )


def transformer(vocab: int = 96, seq_len: int = 64, dim: int = 128, blocks: int = 4) -> keras.Model:
    """The demo's character Transformer (examples/char_model.py)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from char_model import build_model

    return build_model(vocab, seq_len, dim=dim, blocks=blocks)


def data_for(name: str, batch: int, steps: int) -> tf.data.Dataset:
    """A repeated dataset of `steps` distinct batches for model `name`."""
    rng = np.random.default_rng(0)
    n = batch * steps
    if name == "mlp":
        x = rng.normal(size=(n, 1024)).astype("float32")
        y = rng.integers(0, 10, size=n)
    else:
        x = rng.integers(0, 96, size=(n, 64)).astype("int32")
        y = rng.integers(0, 96, size=(n, 64)).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True).repeat()


def compiled(name: str, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = mlp() if name == "mlp" else transformer()
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


class StepTimer(keras.callbacks.Callback):
    """Seconds per step over an epoch, from the end of its first step (after tracing)."""

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if batch == 0:
            self.start = time.perf_counter()
        self.last = batch

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.per_step = (time.perf_counter() - self.start) / self.last


def side_by_side(
    runs: dict[str, Callable[[StepTimer], None]], repeats: int
) -> dict[str, list[float]]:
    """Runs each labelled fit in turn (A B C A B C ...), `repeats` times; seconds per step."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            timer = StepTimer()
            run(timer)
            times[label].append(timer.per_step)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def wide_data(batch: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch of inputs for `deep_mlp` and 10-class labels."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(batch, width)).astype("float32"), rng.integers(0, 10, size=batch)


def deep_mlp(width: int, layers: int) -> keras.Model:
    """A compiled MLP whose activations dominate its memory for large batches (SGD, seed 0)."""
    keras.utils.set_random_seed(0)
    model = mlp(width=width, depth=layers)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def step_peak(pipe: Any, x: np.ndarray, y: np.ndarray, repeats: int) -> tuple[float, float]:
    """Median allocator peak (MiB above the resting level) and seconds of one training step.

    Logical CPU devices share one allocator, so `CPU:0`'s figures cover the whole pipeline.
    The caller sets `TF_ENABLE_ONEDNN_OPTS=1` before TensorFlow starts (see `tfpipe.allocator`).
    """
    why = allocator.unavailable("CPU:0")
    if why is not None:
        raise SystemExit(f"step_peak: {why}")
    fit = dict(batch_size=len(x), epochs=1, verbose=0)
    pipe.fit(x, y, **fit)  # trace and warm up
    peaks, times = [], []
    for _ in range(repeats):
        allocator.reset("CPU:0")
        base = allocator.current_bytes("CPU:0")
        start = time.perf_counter()
        pipe.fit(x, y, **fit)
        times.append(time.perf_counter() - start)
        peaks.append(allocator.peak_bytes("CPU:0") - base)
    return statistics.median(peaks) / 2**20, statistics.median(times)
