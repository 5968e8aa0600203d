"""Keras's own callbacks work unchanged and see the current weights during pipelined training."""

from __future__ import annotations

import os

import keras
import numpy as np

import tfpipe
from tests.models import build, data


class WeightLog(keras.callbacks.Callback):
    """Copies the first kernel of `self.model` after every batch."""

    def __init__(self):
        super().__init__()
        self.kernels = []

    def on_train_batch_end(self, batch, logs=None):
        self.kernels.append(self.model.weights[0].numpy().copy())


def test_callbacks_see_current_weights_like_keras():
    x, y = data("mlp")
    ref, ref_log = build("mlp", "sgd"), WeightLog()
    ref.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = build("mlp", "sgd"), WeightLog()
    tfpipe.fit(model, x, y, batch_size=16, stages=4, micro_batches=2, shuffle=False, verbose=0,
               callbacks=[log])
    assert len(log.kernels) == 4
    for a, b in zip(ref_log.kernels, log.kernels):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert not np.allclose(log.kernels[0], log.kernels[-1])  # weights really moved each step


def test_checkpoint_csv_tensorboard_earlystopping(tmp_path):
    x, y = data("functional")
    model = build("functional", "adam")
    path = tmp_path / "best.keras"
    csv = tmp_path / "log.csv"
    tb = tmp_path / "tb"
    history = tfpipe.fit(
        model, x, y, batch_size=16, epochs=6, stages=3, micro_batches=2, verbose=0,
        validation_data=(x[:32], y[:32]),
        callbacks=[
            keras.callbacks.ModelCheckpoint(str(path), monitor="loss", save_best_only=False),
            keras.callbacks.CSVLogger(str(csv)),
            keras.callbacks.TensorBoard(str(tb)),
            keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=10.0),
        ],
    )
    # EarlyStopping with an impossible min_delta stops after patience+1 epochs
    assert len(history.history["loss"]) == 2
    assert csv.read_text().count("\n") == 3  # header + 2 epochs
    events = [f for _, _, files in os.walk(tb) for f in files if "tfevents" in f]
    assert events
    restored = keras.models.load_model(str(path))
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6)


def test_backup_and_restore_resumes_like_an_uninterrupted_run(tmp_path):
    x, y = data("mlp")
    ref = build("mlp", "adam")
    tfpipe.fit(ref, x, y, batch_size=16, epochs=4, stages=2, micro_batches=2, shuffle=False, verbose=0)

    class Crash(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("simulated crash")

    backup = str(tmp_path / "backup")
    model = build("mlp", "adam")
    try:
        tfpipe.fit(model, x, y, batch_size=16, epochs=4, stages=2, micro_batches=2, shuffle=False,
                   verbose=0, callbacks=[keras.callbacks.BackupAndRestore(backup), Crash()])
    except RuntimeError:
        pass
    resumed = build("mlp", "adam", seed=99)  # different start: everything must come from the backup
    history = tfpipe.fit(resumed, x, y, batch_size=16, epochs=4, stages=2, micro_batches=2,
                         shuffle=False, verbose=0,
                         callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert len(history.history["loss"]) == 2  # epochs 2 and 3 only
    for a, b in zip(ref.weights, resumed.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)


def test_saved_model_file_holds_trained_weights(tmp_path):
    x, y = data("cnn")
    model = build("cnn", "adam")
    before = model.predict(x, verbose=0)
    tfpipe.fit(model, x, y, batch_size=16, epochs=2, stages=4, micro_batches=4, verbose=0)
    path = tmp_path / "trained.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    after = loaded.predict(x, verbose=0)
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, model.predict(x, verbose=0), rtol=1e-6)
    # the user's model keeps working with plain Keras after pipelined training
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
