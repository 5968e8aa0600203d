"""A training process for the crash-safety tests (tests/test_reliability_crash.py).

It trains a small MLP deterministically (CPU, `enable_op_determinism`, fixed seeds, no
shuffling) on 4 logical CPU devices with `tfpipe.fit` (or plain `model.fit` with `--plain`),
optionally with `BackupAndRestore` and `ModelCheckpoint`, and writes the final weights and
the number of epochs it ran to `--out` (an .npz written to a temporary name and renamed, so a
reader never sees half a file).

To let a test SIGKILL it at a known point, it can stop and wait (never finishing on its own):
- `--hang-after E:B`: at the end of batch B of epoch E (0-based), after every callback listed
  before it has run, write the `--ready` file and sleep;
- `--hang-in-save N`: during the N-th save of the model's state (a `.keras` file, a
  `.weights.h5` file or a backup), halfway through the layers, write `--ready` and sleep.
  The model holds a `SaveProbe` layer (the identity, no weights) whose `save_own_variables`
  Keras calls once per save, between the layers before it and the ones after it.

Importing this module only defines `SaveProbe`, `make_model` and `make_data` (the tests use
them to load what the process saved); running it trains.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _die_with_parent() -> None:
    """On Linux, have the kernel SIGKILL this process when its parent dies, so a worker that
    waits to be killed never outlives an interrupted test session. The tests pass their pid in
    RELIABILITY_PARENT_PID, which also catches a parent that died before this call."""
    expected = os.environ.get("RELIABILITY_PARENT_PID")
    if not expected or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        return
    if os.getppid() != int(expected):
        os._exit(4)


if __name__ == "__main__":
    _die_with_parent()

import tfpipe  # noqa: E402

if __name__ == "__main__":
    tfpipe.configure_cpu_devices(4)  # before TensorFlow initialises

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

HANG_SECONDS = 600  # the test kills us long before this
_PROBE = {"saves": 0, "hang_at": None, "ready": None}


def _announce_and_hang(ready: str | None) -> None:
    if ready:
        tmp = ready + ".tmp"
        Path(tmp).write_text(str(os.getpid()))
        os.replace(tmp, ready)
    sys.stdout.flush()
    time.sleep(HANG_SECONDS)
    os._exit(3)  # never reached in the tests


@keras.saving.register_keras_serializable(package="tfpipe_reliability")
class SaveProbe(keras.layers.Layer):
    """The identity; counts the saves of the model's state and can stop in the middle of one."""

    def call(self, x):
        return x

    def save_own_variables(self, store):
        _PROBE["saves"] += 1
        if _PROBE["hang_at"] is not None and _PROBE["saves"] == _PROBE["hang_at"]:
            _announce_and_hang(_PROBE["ready"])


def make_model(seed: int = 0, optimizer: str = "adam") -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(16, activation="tanh"),
        SaveProbe(name="probe"),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(3, activation="softmax"),
    ], name="worker_mlp")
    opt = keras.optimizers.Adam(0.01) if optimizer == "adam" else keras.optimizers.SGD(0.1)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def make_data(n: int = 96, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8)).astype("float32"), rng.integers(0, 3, size=n)


class HangAfter(keras.callbacks.Callback):
    """Stops (announces and sleeps) at the end of batch `batch` of epoch `epoch`."""

    def __init__(self, epoch: int, batch: int, ready: str | None) -> None:
        super().__init__()
        self.at, self.ready, self.epoch = (epoch, batch), ready, -1

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            _announce_and_hang(self.ready)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="final weights (.npz)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--schedule", default="gpipe")
    p.add_argument("--plain", action="store_true", help="model.fit instead of tfpipe.fit")
    p.add_argument("--seed", type=int, default=0, help="initial weights")
    p.add_argument("--backup", help="BackupAndRestore directory")
    p.add_argument("--save-freq", default="epoch", help='"epoch" or batches between backups')
    p.add_argument("--double-checkpoint", action="store_true")
    p.add_argument("--checkpoint", action="append", default=[],
                   help="ModelCheckpoint filepath (repeatable), saved every epoch")
    p.add_argument("--hang-after", help="E:B, stop after batch B of epoch E")
    p.add_argument("--hang-in-save", type=int, help="stop during the N-th save")
    p.add_argument("--ready", help="file written when the process stops to be killed")
    args = p.parse_args(argv)

    tf.config.experimental.enable_op_determinism()
    x, y = make_data()
    model = make_model(args.seed)
    _PROBE.update(hang_at=args.hang_in_save, ready=args.ready)

    callbacks: list[keras.callbacks.Callback] = []
    if args.backup:
        freq = args.save_freq if args.save_freq == "epoch" else int(args.save_freq)
        callbacks.append(keras.callbacks.BackupAndRestore(
            args.backup, save_freq=freq, double_checkpoint=args.double_checkpoint))
    callbacks += [keras.callbacks.ModelCheckpoint(path) for path in args.checkpoint]
    if args.hang_after:
        epoch, batch = (int(v) for v in args.hang_after.split(":"))
        callbacks.append(HangAfter(epoch, batch, args.ready))

    fit_kwargs = dict(batch_size=args.batch_size, epochs=args.epochs, shuffle=False, verbose=0,
                      callbacks=callbacks)
    if args.plain:
        history = model.fit(x, y, **fit_kwargs)
    else:
        history = tfpipe.fit(model, x, y, stages=args.stages, micro_batches=args.micro_batches,
                             schedule=args.schedule, **fit_kwargs)

    arrays = {f"w{i}": v.numpy() for i, v in enumerate(model.weights)}
    arrays["iterations"] = np.asarray(int(model.optimizer.iterations.numpy()))
    arrays["epochs_run"] = np.asarray(len(history.history.get("loss", [])))
    tmp = args.out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, args.out)
    print(json.dumps({"epochs_run": int(arrays["epochs_run"]),
                      "iterations": int(arrays["iterations"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
