"""Reliability: checkpoints do not depend on the pipeline layout that wrote them.

tfpipe keeps the user's own `keras.Variable` objects (it moves their storage, not their
identity), so a `.keras` file or a `.weights.h5` file written after a 4-stage run is an
ordinary Keras file: it loads into plain Keras, into a pipeline with another stage count, and,
with the optimizer state it holds, training continues under another layout exactly as an
uninterrupted `model.fit` would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import tfpipe
from tests.models import build, data

ROOT = Path(__file__).resolve().parents[1]
E1, E2 = 2, 1  # epochs before and after the checkpoint
FIT = dict(batch_size=16, shuffle=False, verbose=0)
_CACHE: dict = {}


def uninterrupted():
    """Plain `model.fit` for E1 + E2 epochs (cached)."""
    if "ref" not in _CACHE:
        x, y = data("functional")
        ref = build("functional", "adam")
        ref.fit(x, y, epochs=E1 + E2, **FIT)
        _CACHE["ref"] = ref
    return _CACHE["ref"]


def trained_on_four_stages(tmp_path):
    """A model after E1 epochs on 4 stages, saved both ways: (model, .keras path, .weights.h5 path)."""
    x, y = data("functional")
    model = build("functional", "adam")
    pipe = tfpipe.Pipeline(model, stages=4, micro_batches=4)
    assert len({s.device for s in pipe.stages}) == 4  # really spread over four devices
    pipe.fit(x, y, epochs=E1, **FIT)
    keras_path, weights_path = tmp_path / "four.keras", tmp_path / "four.weights.h5"
    model.save(keras_path)
    model.save_weights(weights_path)
    return model, keras_path, weights_path


def predict_without_tfpipe(path: Path, x: np.ndarray, tmp_path: Path) -> np.ndarray:
    """Loads and predicts in a fresh process that never imports tfpipe (one CPU device)."""
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, keras, numpy as np\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import tests.models  # registers the custom Scale layer; imports only keras\n"
        f"model = keras.models.load_model({str(path)!r})\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, model.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0))\n"
        "assert 'tfpipe' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(tmp_path / "y.npy")


def assert_same_weights(a: keras.Model, b: keras.Model, rtol=1e-5, atol=1e-6):
    assert len(a.weights) == len(b.weights)
    for va, vb in zip(a.weights, b.weights):
        np.testing.assert_allclose(vb.numpy(), va.numpy(), rtol=rtol, atol=atol, err_msg=va.path)


def test_four_stage_files_load_anywhere_with_identical_predictions(tmp_path):
    model, keras_path, weights_path = trained_on_four_stages(tmp_path)
    x, _ = data("functional", n=40, seed=9)
    expected = model.predict(x, verbose=0)  # plain Keras predict on the trained model

    plain = keras.models.load_model(keras_path)
    np.testing.assert_allclose(plain.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-7)
    assert_same_weights(model, plain, rtol=0, atol=0)
    np.testing.assert_allclose(predict_without_tfpipe(keras_path, x, tmp_path), expected,
                               rtol=1e-6, atol=1e-7)

    two = keras.models.load_model(keras_path)
    np.testing.assert_allclose(tfpipe.predict(two, x, stages=2, micro_batches=3, verbose=0),
                               expected, rtol=1e-6, atol=1e-7)

    fresh = build("functional", "adam", seed=42)  # other initial weights: all must come from the file
    fresh.optimizer.build(fresh.trainable_variables)  # so that the optimizer state loads too
    fresh.load_weights(weights_path)
    assert_same_weights(model, fresh, rtol=0, atol=0)
    np.testing.assert_allclose(fresh.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(tfpipe.predict(fresh, x, stages=2, micro_batches=2, verbose=0),
                               expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("continue_with", ["tfpipe-2-stages", "plain-keras"])
def test_keras_file_resumes_training_under_another_layout(tmp_path, continue_with):
    """4 stages for E1 epochs, `.keras` (weights + Adam state), then E2 more epochs on 2 stages
    (or plain Keras) equals E1 + E2 epochs of plain `model.fit`."""
    ref = uninterrupted()
    trained, keras_path, _ = trained_on_four_stages(tmp_path)
    resumed = keras.models.load_model(keras_path)
    assert int(resumed.optimizer.iterations.numpy()) == int(trained.optimizer.iterations.numpy()) > 0
    x, y = data("functional")
    if continue_with == "plain-keras":
        resumed.fit(x, y, epochs=E2, **FIT)
    else:
        tfpipe.fit(resumed, x, y, epochs=E2, stages=2, micro_batches=2, schedule="1f1b", **FIT)
    assert int(resumed.optimizer.iterations.numpy()) == int(ref.optimizer.iterations.numpy())
    assert_same_weights(ref, resumed)


def test_weights_file_with_optimizer_state_resumes_under_another_layout(tmp_path):
    """`save_weights` also holds the optimizer's variables; a fresh compiled model loads them
    once its optimizer is built (as `BackupAndRestore` does) and resumes on 2 stages."""
    ref = uninterrupted()
    _, _, weights_path = trained_on_four_stages(tmp_path)
    resumed = build("functional", "adam", seed=7)
    resumed.optimizer.build(resumed.trainable_variables)
    resumed.load_weights(weights_path)
    x, y = data("functional")
    tfpipe.fit(resumed, x, y, epochs=E2, stages=2, micro_batches=3, **FIT)
    assert_same_weights(ref, resumed)
