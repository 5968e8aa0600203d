"""Activation recomputation changes memory, not results: same losses and weights as plain Keras."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import tfpipe
from tests.models import StepLog, assert_same_training, build, data
from tests.test_functional_graphs import micro_batch_reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recompute,schedule", [
    ("always", "gpipe"), ("except_last", "1f1b"), ("always", "zb-h1"), ([True, False, True], "1f1b"),
])
def test_recompute_equals_keras(recompute, schedule):
    x, y = data("functional")
    ref, ref_log = build("functional", "adam"), StepLog()
    ref.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = build("functional", "adam"), StepLog()
    pipe = tfpipe.Pipeline(model, stages=3, micro_batches=4, schedule=schedule, recompute=recompute)
    pipe.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[log])
    assert_same_training(ref, ref_log, model, log)


def test_recompute_replays_dropout_and_batchnorm_exactly():
    def model_fn():
        return keras.Sequential([
            keras.Input((8,)), keras.layers.Dense(12, activation="relu"),
            keras.layers.Dropout(0.3), keras.layers.BatchNormalization(),
            keras.layers.Dense(12, activation="relu"), keras.layers.Dense(3, activation="softmax"),
        ])

    def make():
        keras.utils.set_random_seed(0)
        model = model_fn()
        model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
        return model

    x, y = data("mlp")
    ref = make()
    micro_batch_reference(ref, x, y, micro_batches=4, epochs=2)
    model = make()
    tfpipe.fit(model, x, y, batch_size=16, epochs=2, stages=2, micro_batches=4, shuffle=False,
               verbose=0, recompute="always")
    for a, b in zip(ref.weights, model.weights):  # BN statistics too: the replay changed nothing
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def test_recompute_argument_errors():
    with pytest.raises(tfpipe.PipelineError, match=r"recompute='sometimes'.*'never', 'except_last', 'always'"):
        tfpipe.Pipeline(build("mlp"), stages=2, recompute="sometimes")
    with pytest.raises(tfpipe.PipelineError, match=r"recompute=\[True\] has 1 entries for 2 stages"):
        tfpipe.Pipeline(build("mlp"), stages=2, recompute=[True])


def test_recompute_lowers_the_activation_peak(tmp_path):
    out = tmp_path / "recompute.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "recompute_memory.py"), "--repeats", "1",
         "--batch", "4096", "--layers", "16",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = {r["recompute"]: r["peak_mib"] for r in json.loads(out.read_text())["results"]}
    assert 0 < peaks["always"] < peaks["never"], peaks
