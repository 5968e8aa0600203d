"""Reliability: a training process killed with SIGKILL, and the files it was writing.

Real processes (tests/scripts/reliability_worker.py) train a small MLP deterministically on 4
logical CPU devices with `tfpipe.fit` and Keras's own callbacks. Each one that is to be killed
stops at a chosen point and says so by writing a "ready" file: after a batch in the middle
of an epoch, or in the middle of writing a checkpoint (a layer's `save_own_variables` waits
there). The test then sends SIGKILL, restarts the same command and compares the final weights
with those of an uninterrupted run. Every wait is bounded and every child is killed at the end.

What holds (Keras 3.15 callbacks, unchanged):
- `BackupAndRestore(save_freq="epoch")`: killed anywhere between backups, the restarted run
  ends with the weights of an uninterrupted run, bit for bit (same layout).
- `BackupAndRestore(save_freq=N)`: Keras restores the weights of the last backup but starts
  the interrupted epoch again from its first batch; tfpipe resumes exactly as plain Keras does.
- `BackupAndRestore(double_checkpoint=True)` killed while writing a backup: the restart falls
  back to the previous backup and still ends exactly like the uninterrupted run.
- `ModelCheckpoint` with `{epoch}` in the file name: killed while writing, the earlier files
  load.
What does not (Keras writes a checkpoint in place: `open(path, "wb")` for `.keras`,
`h5py.File(path, "w")` for `.weights.h5`, so a kill during a save destroys the file it
replaces): `ModelCheckpoint` to one fixed file name, and `BackupAndRestore` without
`double_checkpoint`. The two tests that say so fail until tfpipe writes checkpoints
atomically or Keras does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent / "scripts" / "reliability_worker.py"
READY_TIMEOUT = 240  # s: up to 6 TensorFlow processes start together on 2 cores
RUN_TIMEOUT = 240
STEPS = 6  # 96 samples / batch 16
EPOCHS = 4


class Worker:
    """One run of the worker script; its output in `<dir>/<name>.npz`, its log beside it."""

    def __init__(self, directory: Path, name: str, *args: str) -> None:
        self.name, self.dir = name, directory
        self.out, self.ready = directory / f"{name}.npz", directory / f"{name}.ready"
        self.log_path = directory / f"{name}.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1",
               "RELIABILITY_PARENT_PID": str(os.getpid())}  # the worker dies with us
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--out", str(self.out), "--ready", str(self.ready),
             *args],
            cwd=directory, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def log_tail(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def kill_when_ready(self) -> None:
        """Waits (bounded) until the worker has stopped at its chosen point, then SIGKILLs it."""
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.ready.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited ({self.proc.returncode}) before its kill "
                            f"point:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} did not reach its kill point in {READY_TIMEOUT} s:\n"
                            f"{self.log_tail()}")
            time.sleep(0.05)
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL
        assert not self.out.exists()  # it really died before finishing

    def result(self) -> dict[str, np.ndarray]:
        """Waits (bounded) for a normal exit; the saved weights, iterations and epochs run."""
        try:
            code = self.proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{self.name} did not finish in {RUN_TIMEOUT} s:\n{self.log_tail()}")
        assert code == 0, f"{self.name} failed ({code}):\n{self.log_tail()}"
        with np.load(self.out) as f:
            return {k: f[k] for k in f.files}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


class Workers:
    """Starts workers and kills whatever still runs when the test (or module) ends."""

    def __init__(self, directory: Path) -> None:
        self.dir, self.all = directory, []

    def start(self, name: str, *args: str) -> Worker:
        worker = Worker(self.dir, name, *args)
        self.all.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.all:
            worker.stop()


@pytest.fixture
def workers(tmp_path):
    pool = Workers(tmp_path)
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """The runs that every test below begins with, started together to share the 2 cores:
    the uninterrupted reference and each run that is to be killed."""
    d = tmp_path_factory.mktemp("crash")
    pool = Workers(d)
    runs = {
        "reference": pool.start("reference", "--backup", str(d / "ref-backup")),
        # stops after batch 2 of epoch 2 (0-based): backups of epochs 0 and 1 exist
        "mid_epoch": pool.start("mid_epoch", "--backup", str(d / "epoch-backup"),
                                "--hang-after", "2:2"),
        # backups every 4 batches: after batch 3 of epoch 0 and batch 1 of epoch 1
        "mid_epoch_steps": pool.start("mid_epoch_steps", "--backup", str(d / "step-backup"),
                                      "--save-freq", "4", "--hang-after", "1:3"),
        # the 2nd backup (end of epoch 1) is being written
        "in_backup_double": pool.start("in_backup_double", "--backup",
                                       str(d / "double-backup"), "--double-checkpoint",
                                       "--hang-in-save", "2"),
        "in_backup_single": pool.start("in_backup_single", "--backup",
                                       str(d / "single-backup"), "--hang-in-save", "2"),
        # saves: epoch 1 -> #1 fixed.keras, #2 epoch-01.keras; epoch 2 -> #3, #4;
        # epoch 3 -> #5 fixed.keras is being written
        "in_checkpoint": pool.start("in_checkpoint", "--checkpoint", str(d / "fixed.keras"),
                                    "--checkpoint", str(d / "epoch-{epoch:02d}.keras"),
                                    "--hang-in-save", "5"),
    }
    try:
        yield d, pool, runs
    finally:
        pool.stop_all()


def assert_same_weights(a: dict, b: dict, rtol: float, atol: float) -> None:
    keys = sorted(k for k in a if k.startswith("w"))
    assert keys and keys == sorted(k for k in b if k.startswith("w"))
    for k in keys:
        np.testing.assert_allclose(b[k], a[k], rtol=rtol, atol=atol, err_msg=k)


def metadata(backup: Path) -> dict:
    return json.loads((backup / "training_metadata.json").read_text())


def test_sigkill_mid_epoch_then_restart_ends_like_an_uninterrupted_run(started, workers):
    d, _, runs = started
    backup = d / "epoch-backup"
    runs["mid_epoch"].kill_when_ready()
    assert (backup / "latest.weights.h5").exists() and metadata(backup)["epoch"] == 2

    # other initial weights: everything must come from the backup
    resumed = workers.start("mid_epoch_resumed", "--backup", str(backup), "--seed", "99").result()
    reference = runs["reference"].result()
    assert int(reference["epochs_run"]) == EPOCHS and int(reference["iterations"]) == EPOCHS * STEPS
    assert int(resumed["epochs_run"]) == EPOCHS - 2  # epochs 2 and 3 only
    assert int(resumed["iterations"]) == EPOCHS * STEPS
    assert_same_weights(reference, resumed, rtol=0, atol=1e-6)
    assert not backup.exists()  # Keras deletes the backup after a finished run


def test_sigkill_with_step_backups_resumes_exactly_as_plain_keras_does(started, workers):
    """Keras's `BackupAndRestore(save_freq=N)` restores the last backup's weights but replays
    the interrupted epoch from its first batch (it records the batch and does not use it), so
    the run does 2 more steps than an uninterrupted one. tfpipe, on another layout, resumes
    exactly as plain `model.fit` does from the same backup."""
    d, _, runs = started
    backup = d / "step-backup"
    runs["mid_epoch_steps"].kill_when_ready()
    assert metadata(backup) == {"epoch": 1, "batch": 1}
    for copy in ("step-backup-tfpipe", "step-backup-keras"):
        shutil.copytree(backup, d / copy)
    pipelined = workers.start("steps_tfpipe", "--backup", str(d / "step-backup-tfpipe"),
                              "--save-freq", "4", "--stages", "2", "--micro-batches", "3",
                              "--schedule", "1f1b")
    plain = workers.start("steps_keras", "--backup", str(d / "step-backup-keras"),
                          "--save-freq", "4", "--plain")
    pipelined, plain = pipelined.result(), plain.result()
    assert int(pipelined["iterations"]) == int(plain["iterations"]) == EPOCHS * STEPS + 2
    assert_same_weights(plain, pipelined, rtol=1e-5, atol=1e-6)


def test_sigkill_while_writing_a_double_checkpoint_backup_resumes_from_the_previous_one(
        started, workers):
    d, _, runs = started
    backup = d / "double-backup"
    runs["in_backup_double"].kill_when_ready()
    assert (backup / "latest.weights.h5.bkp").exists()  # epoch 0's backup, copied aside first
    resumed = workers.start("double_resumed", "--backup", str(backup),
                            "--double-checkpoint").result()
    assert int(resumed["epochs_run"]) == EPOCHS - 1  # from the end of epoch 0
    assert_same_weights(runs["reference"].result(), resumed, rtol=0, atol=1e-6)


def test_sigkill_while_writing_a_backup_keeps_the_previous_backup(started, workers):
    """Fails with Keras 3.15: `BackupAndRestore` (default `double_checkpoint=False`) rewrites
    `latest.weights.h5` in place, so a kill during the write leaves no loadable backup and the
    restart stops with `OSError` instead of resuming from the previous epoch."""
    d, _, runs = started
    backup = d / "single-backup"
    runs["in_backup_single"].kill_when_ready()
    restart = workers.start("single_resumed", "--backup", str(backup))
    try:
        code = restart.proc.wait(timeout=RUN_TIMEOUT)
    finally:
        restart.stop()
    assert code == 0, (
        "the previous backup was destroyed by the interrupted save (Keras writes "
        f"{backup / 'latest.weights.h5'} in place); the restart failed:\n{restart.log_tail()}"
    )
    resumed = restart.result()
    assert_same_weights(runs["reference"].result(), resumed, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def killed_in_checkpoint(started):
    d, _, runs = started
    runs["in_checkpoint"].kill_when_ready()
    return d


def load(path: Path):
    """`keras.models.load_model` with the worker's custom layer registered."""
    spec = importlib.util.spec_from_file_location("reliability_worker", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # registers SaveProbe; trains nothing
    import keras

    return keras.models.load_model(path)


def test_sigkill_while_writing_a_numbered_checkpoint_keeps_the_earlier_ones(killed_in_checkpoint):
    d = killed_in_checkpoint
    assert not (d / "epoch-03.keras").exists()
    for epoch in (1, 2):
        model = load(d / f"epoch-{epoch:02d}.keras")
        assert int(model.optimizer.iterations.numpy()) == epoch * STEPS


def test_sigkill_while_overwriting_a_checkpoint_keeps_the_previous_one(killed_in_checkpoint):
    """Fails with Keras 3.15: `ModelCheckpoint("fixed.keras")` overwrites the file in place
    (`saving_lib.save_model` does `open(filepath, "wb")` and writes the zip into it), so a kill
    during epoch 3's save leaves a truncated file where epoch 2's good checkpoint was."""
    path = killed_in_checkpoint / "fixed.keras"
    try:
        model = load(path)
    except Exception as err:  # noqa: BLE001 - any failure to load is the finding
        pytest.fail(f"the previous checkpoint {path.name} ({path.stat().st_size} bytes left) no "
                    f"longer loads after a save was killed half-way: {type(err).__name__}: {err}")
    assert int(model.optimizer.iterations.numpy()) == 2 * STEPS
