"""Shared pieces of the benchmarks: models, data, and side-by-side timing of Keras fits."""

from __future__ import annotations

import runpy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from benchmarks.speed_table import median
from tfpipe import allocator

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MiB = 2**20


def mlp(width: int = 1024, depth: int = 8, classes: int = 10) -> keras.Model:
    """The peer benchmark's model: depth x Dense(width, relu) + Dense(classes)."""
    return keras.Sequential(
        [keras.Input((width,))]
        + [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
        + [keras.layers.Dense(classes)],
        name="mlp",
    )


def transformer(vocab: int = 96, seq_len: int = 64, dim: int = 128, blocks: int = 4) -> keras.Model:
    """The demo's character Transformer (examples/char_model.py, not a package: run by path)."""
    build_model = runpy.run_path(str(EXAMPLES / "char_model.py"))["build_model"]
    return build_model(vocab, seq_len, dim=dim, blocks=blocks)


def plain_transformer(vocab: int = 96, seq_len: int = 32, dim: int = 64,
                      blocks: int = 12) -> keras.Model:
    """The demo's Transformer with each block written out in plain Keras layers
    (LayerNormalization, MultiHeadAttention, Add, LayerNormalization, Dense, Dense, Add):
    about 100 layer calls at 12 blocks; token embedding only."""
    ids = keras.Input((seq_len,), dtype="int32", name="ids")
    h = keras.layers.Embedding(vocab, dim, name="tokens")(ids)
    for i in range(blocks):
        n = keras.layers.LayerNormalization(name=f"norm1_{i}")(h)
        a = keras.layers.MultiHeadAttention(4, dim // 4, name=f"attention_{i}")(
            n, n, use_causal_mask=True)
        h = keras.layers.Add(name=f"add1_{i}")([h, a])
        n = keras.layers.LayerNormalization(name=f"norm2_{i}")(h)
        u = keras.layers.Dense(2 * dim, activation="gelu", name=f"up_{i}")(n)
        d = keras.layers.Dense(dim, name=f"down_{i}")(u)
        h = keras.layers.Add(name=f"add2_{i}")([h, d])
    h = keras.layers.LayerNormalization(name="final_norm")(h)
    return keras.Model(ids, keras.layers.Dense(vocab, name="logits")(h), name="plain_transformer")


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


def step_peaks(fit_once: Callable[[], Any], devices: list[str], repeats: int) -> dict[str, Any]:
    """Per device: the allocator peak of `fit_once()` above the resting level, and in all.

    The first call traces and is not measured. Then, `repeats` times: each device's peak is
    reset and its resting level read (`tfpipe.allocator`), `fit_once()` runs and is timed,
    and each peak is read. Logical CPU devices share one allocator, so a `CPU:i` figure
    covers all of them.

    Args:
        fit_once: one training step (or fit).
        devices: the names `tfpipe.allocator` takes (`GPU:0`, `CPU:0`, or full names).
        repeats: measured calls.

    Returns:
        `peak_above_rest_mib`, `peak_mib` (medians over the repeats) and `rest_mib` (the
        last repeat's), one entry per device, None where TensorFlow reports no allocator
        statistics; and `step_s`, the median seconds of a call.
    """
    fit_once()
    above: list[list[float]] = [[] for _ in devices]
    total: list[list[float]] = [[] for _ in devices]
    rest: list[float | None] = [None for _ in devices]
    seconds = []
    readable = [True for _ in devices]
    for _ in range(repeats):
        base: list[float] = []
        for i, d in enumerate(devices):
            try:
                allocator.reset(d)
                base.append(allocator.current_bytes(d))
            except (ValueError, RuntimeError, tf.errors.OpError):
                readable[i] = False
                base.append(0.0)
        start = time.perf_counter()
        fit_once()
        seconds.append(time.perf_counter() - start)
        for i, d in enumerate(devices):
            if readable[i]:
                peak = allocator.peak_bytes(d)
                above[i].append((peak - base[i]) / MiB)
                total[i].append(peak / MiB)
                rest[i] = base[i] / MiB
    return {
        "peak_above_rest_mib": [median(v) if ok else None for v, ok in zip(above, readable)],
        "peak_mib": [median(v) if ok else None for v, ok in zip(total, readable)],
        "rest_mib": rest,
        "step_s": median(seconds),
    }


def step_peak(pipe: Any, x: np.ndarray, y: np.ndarray, repeats: int) -> tuple[float, float]:
    """Median allocator peak (MiB above the resting level) and seconds of one training step.

    Logical CPU devices share one allocator, so `CPU:0`'s figures cover the whole pipeline.
    The caller sets `TF_ENABLE_ONEDNN_OPTS=1` before TensorFlow starts (see `tfpipe.allocator`).
    """
    why = allocator.unavailable("CPU:0")
    if why is not None:
        raise SystemExit(f"step_peak: {why}")
    fit = dict(batch_size=len(x), epochs=1, verbose=0)
    r = step_peaks(lambda: pipe.fit(x, y, **fit), ["CPU:0"], repeats)
    return r["peak_above_rest_mib"][0], r["step_s"]
