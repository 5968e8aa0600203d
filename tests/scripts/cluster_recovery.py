"""A training client for tests/test_cluster_recovery.py: resume after a worker died.

It trains a small MLP deterministically (`enable_op_determinism`, fixed seeds, no shuffling)
with `keras.callbacks.BackupAndRestore(--backup)` (one backup per epoch) and a
`ModelCheckpoint` per epoch (`--checkpoints/epoch-NN.keras`, the whole model), either
pipelined in 2 stages on two `tfpipe worker`s (`--cluster host:port,host:port`, under a
`tfpipe.Watchdog`) or with plain `model.fit` in this process (`--plain`). At the end it writes
the final weights and optimizer variables to `--out` (.npz, written to a temporary name and
renamed) and prints one JSON line prefixed with `RESULT `. `--plain-out FILE` adds a plain
`model.fit` of a fresh model in the same process after a pipelined run (one process start
less for the tests).

`--pause-after E:B --ready FILE`: at the end of batch B of epoch E (0-based), after the other
callbacks, write FILE and wait (at most `PAUSE_S`) until a worker stops answering status
calls, then carry on, so that the next step meets the dead worker. A `WorkerUnavailableError`
is printed in the RESULT line and ends the process with exit status
`tfpipe.cluster.EXIT_WORKER_UNAVAILABLE` (75, "temporary failure, try again").
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tfpipe  # noqa: E402

cluster_module = importlib.import_module("tfpipe.cluster")  # `tfpipe.cluster` is the function
PAUSE_S = 60.0
SAMPLES, BATCH, MICRO_BATCHES = 256, 32, 4


def make_model(seed: int = 7) -> Any:
    """The MLP both runs train: 4 x Dense(32, tanh) and a Dense(3) head, Adam."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((16,))]
        + [keras.layers.Dense(32, activation="tanh", name=f"d{i}") for i in range(4)]
        + [keras.layers.Dense(3, name="out")],
        name="recovery_mlp",
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def make_data(n: int = SAMPLES) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 16)).astype("float32")
    y = x[:, :3].argmax(axis=1).astype("int32")
    return x, y


def where(device: str) -> str:
    """`client` for this process's devices, `task:i` for worker i's."""
    import tensorflow as tf

    spec = tf.DeviceSpec.from_string(device)
    return "client" if spec.job in (None, "localhost") else f"task:{spec.task}"


def save(path: str, arrays: dict[str, Any]) -> None:
    """Writes arrays to an .npz under a temporary name, then renames it: never half a file."""
    import numpy as np

    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="final weights (.npz)")
    p.add_argument("--cluster", help="the two workers, host:port,host:port")
    p.add_argument("--plain", action="store_true", help="plain model.fit in this process")
    p.add_argument("--plain-out", help="with --cluster: afterwards, also train a fresh model "
                   "with plain model.fit in this process and write its weights here (.npz)")
    p.add_argument("--backup", required=True, help="BackupAndRestore directory")
    p.add_argument("--checkpoints", required=True, help="folder for epoch-NN.keras files")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--pause-after", help="E:B, wait for a worker to die after batch B of epoch E")
    p.add_argument("--ready", help="file written when pausing")
    args = p.parse_args(argv)
    if bool(args.cluster) == args.plain:
        p.error("give exactly one of --cluster and --plain")

    devices = tfpipe.cluster(args.cluster, threads=1) if args.cluster else None  # before TF

    import keras
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    x, y = make_data()
    model = make_model()
    addresses = cluster_module.connected_addresses() if args.cluster else []

    class PauseAfter(keras.callbacks.Callback):  # type: ignore[misc]
        """Announces the pause, then waits until a worker stops answering (bounded)."""

        def __init__(self, epoch: int, batch: int) -> None:
            super().__init__()
            self.at, self.epoch = (epoch, batch), -1

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.epoch = epoch

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if (self.epoch, batch) != self.at:
                return
            tmp = args.ready + ".tmp"
            Path(tmp).write_text(str(os.getpid()))
            os.replace(tmp, args.ready)
            print(f"PAUSED after epoch {self.epoch} batch {batch}", flush=True)
            deadline = time.monotonic() + PAUSE_S
            while time.monotonic() < deadline:
                if any(cluster_module.probe(a, 1.0) is not None for a in addresses):
                    print("A WORKER IS GONE", flush=True)
                    return
                time.sleep(0.1)
            print(f"no worker died within {PAUSE_S} s; carrying on", flush=True)

    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.BackupAndRestore(args.backup),
        keras.callbacks.ModelCheckpoint(os.path.join(args.checkpoints, "epoch-{epoch:02d}.keras")),
    ]
    if args.pause_after:
        epoch, batch = (int(v) for v in args.pause_after.split(":"))
        callbacks.append(PauseAfter(epoch, batch))
    fit_kwargs = dict(batch_size=BATCH, epochs=args.epochs, shuffle=False, verbose=0,
                      callbacks=callbacks)

    def snapshot() -> dict[str, Any]:
        """The model's and the optimizer's variables, read while the workers run."""
        arrays = {f"w{i}": v.numpy() for i, v in enumerate(model.weights)}
        arrays.update({f"opt{i}": v.numpy() for i, v in enumerate(model.optimizer.variables)})
        return arrays

    result: dict[str, Any] = {}
    started = time.monotonic()
    if args.plain:
        history = model.fit(x, y, **fit_kwargs)
        arrays = snapshot()
    else:
        pipe = tfpipe.Pipeline(model, stages=2, devices=devices, micro_batches=MICRO_BATCHES)
        try:
            with tfpipe.Watchdog.for_pipeline(pipe, timeout_s=10):
                history = pipe.fit(x, y, **fit_kwargs)
                arrays = snapshot()
        except tfpipe.WorkerUnavailableError as err:
            result.update(error=type(err).__name__, message=str(err), address=err.address,
                          task=err.task, stages=list(err.stages or ()),
                          cause=type(err.__cause__).__name__ if err.__cause__ else None)
            gc.collect()  # release Keras's tf.data iterator now (see docs/cluster.md)
            print("RESULT " + json.dumps(result), flush=True)
            return int(cluster_module.EXIT_WORKER_UNAVAILABLE)
        optimizer = model.optimizer
        result["stage_variables"] = [[v.path for v in s.model.weights] for s in pipe.stages]
        result["variables"] = {v.path: where(v.value.device) for v in model.weights}
        result["slots"] = {  # each trainable variable's Adam slots (m, v): where they live
            v.path: [where(slots[optimizer._get_variable_index(v)].value.device)  # noqa: SLF001
                     for slots in (optimizer._momentums, optimizer._velocities)]  # noqa: SLF001
            for v in model.trainable_variables
        }
    result["fit_seconds"] = time.monotonic() - started
    result["epochs"] = list(history.epoch)
    result["losses"] = [float(v) for v in history.history.get("loss", [])]
    result["iterations"] = int(model.optimizer.iterations.numpy())
    save(args.out, arrays)
    if args.cluster and args.plain_out:
        model = make_model()  # on this process's CPU, beside the workers
        result["plain_devices"] = sorted({where(v.value.device) for v in model.weights})
        plain = model.fit(x, y, batch_size=BATCH, epochs=args.epochs, shuffle=False, verbose=0)
        result["plain_losses"] = [float(v) for v in plain.history["loss"]]
        save(args.plain_out, snapshot())
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
