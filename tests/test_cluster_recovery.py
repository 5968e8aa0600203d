"""Recovery across a worker restart: a killed `tfpipe worker`, restarted, and the run resumed.

Two real `tfpipe worker` processes on loopback (tests/workers.py) hold the two stages of a
deterministic MLP fit (tests/scripts/cluster_recovery.py, a client process with
`keras.callbacks.BackupAndRestore` and a `ModelCheckpoint` per epoch). The client pauses in
the middle of epoch 2, after the backup of epoch 1 exists; the test SIGKILLs worker 1 and
the client ends with a `WorkerUnavailableError` (exit status 75). The test starts worker 1
again on its old port and runs the same client command again: it restores the backup onto
the new worker, trains epochs 2 and 3, and ends with the weights and optimizer state of an
uninterrupted pipelined run on the same workers bit for bit, and with those of plain
`model.fit` to float tolerance. The checkpoints written before the failure still load and
match the uninterrupted run's. Every wait is bounded and every process is ended.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.workers import ENV, WorkerPool

SCRIPT = Path(__file__).resolve().parent / "scripts" / "cluster_recovery.py"
CLIENT_TIMEOUT_S = 120.0
EXIT_WORKER_UNAVAILABLE = 75  # tfpipe.cluster.EXIT_WORKER_UNAVAILABLE
EPOCHS = 4
PAUSE = (2, 3)  # after batch 3 of epoch 2 (0-based): the backup holds epochs 0 and 1


class Client:
    """One run of the client script; its output in `<dir>/<name>.log`."""

    def __init__(self, directory: Path, name: str, *args: str) -> None:
        self.name, self.out = name, directory / f"{name}.npz"
        self.log_path = directory / f"{name}.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), "--out", str(self.out), *args],
                stdout=log, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=directory,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def finish(self, expect_status: int = 0) -> dict[str, Any]:
        """Waits (bounded) for the exit status `expect_status`; the RESULT the client printed."""
        try:
            code = self.proc.wait(timeout=CLIENT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{self.name} did not end in {CLIENT_TIMEOUT_S} s:\n{self.log()[-4000:]}")
        assert code == expect_status, f"{self.name} exited {code}:\n{self.log()[-4000:]}"
        results = [line[len("RESULT "):] for line in self.log().splitlines()
                   if line.startswith("RESULT ")]
        assert results, self.log()[-4000:]
        result: dict[str, Any] = json.loads(results[-1])
        return result

    def weights(self) -> dict[str, np.ndarray]:
        with np.load(self.out) as f:
            return {k: f[k] for k in f.files}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def wait_for(path: Path, client: Client, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if client.proc.poll() is not None:
            pytest.fail(f"{client.name} exited ({client.proc.returncode}) before pausing:\n"
                        f"{client.log()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{client.name} did not pause within {timeout_s} s:\n"
                        f"{client.log()[-4000:]}")
        time.sleep(0.05)


def model_state(path: Path) -> list[np.ndarray]:
    """The weights and optimizer variables of a saved `.keras` model."""
    import keras

    model = keras.saving.load_model(path)
    return [v.numpy() for v in model.weights] + [v.numpy() for v in model.optimizer.variables]


def test_killed_worker_restarted_and_resumed_ends_like_an_uninterrupted_run(tmp_path: Path) -> None:
    pool = WorkerPool(tmp_path)
    clients: list[Client] = []
    began = time.monotonic()
    phases: dict[str, float] = {}  # seconds from the start at which each phase ended

    def client(name: str, *args: str) -> Client:
        c = Client(tmp_path, name, "--epochs", str(EPOCHS),
                   "--backup", str(tmp_path / f"{name}-backup"),
                   "--checkpoints", str(tmp_path / f"{name}-checkpoints"), *args)
        clients.append(c)
        return c

    try:
        addresses, (_, victim) = pool.start(2)
        cluster = ",".join(addresses)
        phases["workers ready"] = time.monotonic() - began

        # 1. Train until the middle of epoch 2, kill worker 1 (stage 1).
        ready = tmp_path / "paused"
        first = client("run", "--cluster", cluster, "--pause-after", f"{PAUSE[0]}:{PAUSE[1]}",
                       "--ready", str(ready))
        wait_for(ready, first, CLIENT_TIMEOUT_S)
        backup, checkpoints = tmp_path / "run-backup", tmp_path / "run-checkpoints"
        metadata = json.loads((backup / "training_metadata.json").read_text())
        assert metadata["epoch"] == PAUSE[0], metadata  # epochs 0 and 1 are backed up
        assert (backup / "latest.weights.h5").exists()
        saved = {p.name: p.stat() for p in checkpoints.iterdir()}
        assert sorted(saved) == ["epoch-01.keras", "epoch-02.keras"], sorted(saved)
        phases["paused"] = time.monotonic() - began
        victim.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert victim.proc.wait(timeout=10) == -signal.SIGKILL

        # 2. The client ends with WorkerUnavailableError naming worker 1, exit status 75.
        failed = first.finish(expect_status=EXIT_WORKER_UNAVAILABLE)
        failed_after_s = time.monotonic() - killed
        assert failed["error"] == "WorkerUnavailableError", failed
        assert (failed["address"], failed["task"], failed["stages"]) == (addresses[1], 1, [1])
        assert failed["cause"] == "UnavailableError"
        message = failed["message"]
        assert f"Worker task 1 at {addresses[1]}" in message and "stage 1" in message, message
        assert f"tfpipe worker --cluster {cluster} --task 1" in message, message
        assert "resume from your last checkpoint" in message, message
        assert failed_after_s < 30, failed_after_s
        assert not first.out.exists()
        assert json.loads((backup / "training_metadata.json").read_text()) == metadata

        # 3. Restart worker 1 on its port; the same command resumes from the backup.
        pool.restart(addresses, 1)
        phases["restarted"] = time.monotonic() - began
        second = client("run", "--cluster", cluster)  # the same command as the first run
        resumed = second.finish()
        assert resumed["epochs"] == [2, 3], resumed  # epochs 0 and 1 were not run again
        assert resumed["iterations"] == EPOCHS * 8  # 256 samples / 32 per batch
        for stage, names in enumerate(resumed["stage_variables"]):  # restored onto the workers
            for name in names:
                assert resumed["variables"][name] == f"task:{stage}", name
                assert resumed["slots"][name] == [f"task:{stage}"] * 2, name
        resumed_weights = second.weights()
        phases["resumed"] = time.monotonic() - began

        # 4. The same run without a failure, on the same workers; the same process then runs
        # plain model.fit on its own CPU.
        plain_out = tmp_path / "plain.npz"
        uninterrupted = client("uninterrupted", "--cluster", cluster, "--plain-out", str(plain_out))
        reference = uninterrupted.finish()
        assert reference["epochs"] == [0, 1, 2, 3]
        assert reference["plain_devices"] == ["client"]
        reference_weights = uninterrupted.weights()
        phases["uninterrupted"] = time.monotonic() - began
        with np.load(plain_out) as f:
            plain_weights = {k: f[k] for k in f.files}
    finally:
        for c in clients:
            c.stop()
        pool.stop_all()

    # Bit for bit like the uninterrupted pipelined run: weights, Adam slots, step counter.
    assert sorted(resumed_weights) == sorted(reference_weights)
    for key, value in reference_weights.items():
        np.testing.assert_array_equal(resumed_weights[key], value, err_msg=key)
    assert resumed["losses"] == reference["losses"][2:]
    # And like plain model.fit on one device, to float tolerance (micro-batch sums differ).
    weight_keys = sorted(k for k in plain_weights if k.startswith("w"))
    assert weight_keys == sorted(k for k in reference_weights if k.startswith("w"))
    diff = max(float(np.max(np.abs(resumed_weights[k] - plain_weights[k]))) for k in weight_keys)
    assert diff < 1e-5, diff
    np.testing.assert_allclose(resumed["losses"], reference["plain_losses"][2:], rtol=1e-5)

    # Nothing saved before the failure was lost: the epoch checkpoints are untouched and load,
    # equal to the uninterrupted run's; the resumed run added the later ones.
    after = {p.name: p.stat() for p in checkpoints.iterdir()}
    assert sorted(after) == [f"epoch-0{e}.keras" for e in range(1, EPOCHS + 1)], sorted(after)
    for name, stat in saved.items():
        assert (after[name].st_mtime_ns, after[name].st_size) == (stat.st_mtime_ns, stat.st_size)
    for name in sorted(after):
        ours = model_state(checkpoints / name)
        theirs = model_state(tmp_path / "uninterrupted-checkpoints" / name)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert not backup.exists()  # Keras deletes the backup once a fit completes
    print(f"\nfailed {failed_after_s:.2f} s after SIGKILL; resumed vs model.fit max |dw| "
          f"{diff:.2e}; phases ended at (s): {json.dumps({k: round(v, 1) for k, v in phases.items()})}")
