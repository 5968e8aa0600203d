"""Smoke tests for the examples in examples/: each runs as a script with tiny settings, prints
its stage table, trains pipelined with a falling loss, and prints its final metric."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, args: list[str], tmp_path: Path) -> str:
    """Runs examples/<name> in a subprocess (cwd a temporary folder) and returns its stdout."""
    env = {**os.environ, "CI": "1", "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout[-2000:] + proc.stderr[-3000:])
    return proc.stdout


def stage_table(out: str) -> list[list[str]]:
    """The rows of the printed stage table, each split into columns."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if re.match(r"stage\s+layers\s+params", line))
    assert set(lines[header + 1].replace(" ", "")) == {"-"}, lines[header + 1]
    rows = []
    for line in lines[header + 2:]:
        if line.startswith("Total params:"):
            return rows
        rows.append(re.split(r"\s{2,}", line.strip()))
    raise AssertionError(f"no 'Total params' line after the stage table:\n{out}")


def epoch_losses(out: str) -> list[float]:
    match = re.search(r"^loss by epoch: ([0-9. ]+)$", out, re.M)
    assert match, out
    return [float(v) for v in match.group(1).split()]


def check_training(out: str, epochs: int, metric: str, upper: float = 1.0) -> float:
    """The loss fell over the epochs, and the final `metric` is printed, within [0, upper]."""
    losses = epoch_losses(out)
    assert len(losses) == epochs and losses[-1] < losses[0], losses
    match = re.search(rf"^{metric} ([0-9.]+)", out, re.M)
    assert match, out
    value = float(match.group(1))
    assert 0.0 <= value <= upper, value
    return value


def test_convnet(tmp_path):
    out = run_example("convnet.py", ["--epochs", "2", "--train", "512", "--test", "128",
                                     "--image-size", "16", "--width", "8"], tmp_path)
    assert "4 stages x 4 micro-batches, schedule '1f1b'" in out
    rows = stage_table(out)
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    assert rows[0][1].startswith("c1_conv") and rows[-1][1].endswith("logits (5)")
    check_training(out, 2, "test loss [0-9.]+, test accuracy")


def test_transformer_classifier(tmp_path):
    out = run_example("transformer_classifier.py", ["--epochs", "2", "--train", "512",
                                                    "--val", "128", "--dim", "16"], tmp_path)
    assert "4 stages x 4 micro-batches, schedule 'gpipe', balanced by layer counts" in out
    rows = stage_table(out)
    assert [r[1] for r in rows] == ["embed (1)", "block_0 (1)", "block_1 (1)", "pool .. logits (3)"]
    # the padding mask is a model input used only by later stages
    for k, previous in [(1, "embed"), (2, "block_0"), (3, "block_1")]:
        assert f"stage {k} receives: {previous}, mask" in out
    check_training(out, 2, "validation accuracy")


def test_resnet(tmp_path):
    out = run_example("resnet.py", ["--epochs", "2", "--train", "512", "--val", "128",
                                    "--image-size", "16", "--width", "8", "--blocks", "1"],
                      tmp_path)
    assert "4 stages x 4 micro-batches, schedule '1f1b', balanced by time" in out
    assert re.search(r"^stage\s+layers\s+params\s+act/sample\s+time ms\s+device", out, re.M)
    rows = stage_table(out)
    assert len(rows) == 4 and all(float(r[4]) > 0 for r in rows)
    assert rows[0][1].startswith("stem_conv") and re.search(r"\.\. logits \(\d+\)$", rows[-1][1])
    check_training(out, 2, "validation accuracy")


def test_gpt(tmp_path):
    out = run_example("gpt.py", ["--epochs", "2", "--steps-per-epoch", "5", "--dim", "32",
                                 "--layers", "2", "--batch-size", "16", "--chars", "50000",
                                 "--samples", "2", "--generate", "40"], tmp_path)
    assert "4 stages x 4 micro-batches, schedule 'interleaved'" in out
    rows = stage_table(out)
    devices = [r[-1] for r in rows]
    # 2 devices x 2 chunks: device 0 holds pieces 0 and 2, device 1 pieces 1 and 3
    assert devices[0] == devices[2] != devices[1] == devices[3], devices
    assert rows[0][1].startswith("token_embed") and rows[-1][1].endswith("tied_logits (2)")
    assert "used by stages 0 and 3; recompute per stage: [True, True, True, False]" in out
    check_training(out, 2, "held-out loss [0-9.]+ nats/char, perplexity", upper=96.0)
    samples = out.split("--- sampled text ---", 1)[1]
    assert samples.count("\n---") == 2 and "def " in samples and "import " in samples


def test_two_host_with_local_workers(tmp_path):
    """Without --cluster the example starts two `tfpipe worker` processes, puts one stage on
    each, and stops them at the end."""
    env = {**os.environ, "CI": "1", "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "two_host.py"), "--epochs",
                           "2", "--train", "512", "--test", "128", "--image-size", "16",
                           "--width", "4"], capture_output=True, text=True, timeout=180, env=env,
                          cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, (out[-2000:] + proc.stderr[-3000:])
    pids = [int(p) for p in re.findall(r"^started `tfpipe worker --cluster \S+ --task \d` "
                                       r"\(pid (\d+)\)$", out, re.M)]
    assert len(pids) == 2, out
    workers = [f"/job:worker/replica:0/task:{i}/device:CPU:0" for i in range(2)]
    assert "2 stages x 4 micro-batches, schedule '1f1b'" in out
    assert [r[-1] for r in stage_table(out)] == workers
    for i, device in enumerate(workers):
        assert re.search(rf"^stage {i}: \d+ variables on {device}$", out, re.M), out
        assert re.search(rf"^optimizer variables .*\d+ on {device}", out, re.M), out
    check_training(out, 2, "test loss [0-9.]+, test accuracy")
    assert "stopped 2 local workers" in out
    for pid in pids:  # ended and reaped by the example
        try:
            os.kill(pid, 0)
            raise AssertionError(f"worker pid {pid} still runs")
        except ProcessLookupError:
            pass
    assert "Failed to remove function remotely" not in proc.stderr  # freed before stopping


def test_lora_causal_lm(tmp_path):
    out = run_example("lora_causal_lm.py", ["--pretrain-steps", "4", "--finetune-steps", "6",
                                            "--chars", "20000", "--dim", "32", "--seq-len", "32",
                                            "--batch-size", "16"], tmp_path)
    rows = stage_table(out)
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    # the backbone is read through: stages start inside it, at its transformer layers
    assert all("llama_backbone" in r[1] for r in rows), rows
    assert rows[1][1].startswith("llama_backbone/transformer_layer_")
    match = re.search(r"LoRA rank 4: ([0-9,]+) of ([0-9,]+) parameters train \((\d+) variables, "
                      r"(\d+) optimizer slots\)", out)
    assert match, out
    trainable, total = (int(match.group(i).replace(",", "")) for i in (1, 2))
    variables, slots = int(match.group(3)), int(match.group(4))
    assert 0 < trainable < total / 5 and slots == 2 * variables  # Adam's m and v, LoRA only
    losses = epoch_losses(out)
    assert len(losses) == 2 and losses[-1] < losses[0], losses
    assert "reloaded model gives the same logits: True" in out


def test_bigger_than_one_device(tmp_path):
    """One memory-capped worker is killed with the clear error; four train, each under the cap."""
    from benchmarks import cgroups

    reason = cgroups.unavailable()
    if reason is not None:
        pytest.skip(reason=reason)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "bigger_than_one_device.py"),
                           "--quick"], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    one, four = proc.stdout.split("--- 4 worker(s) ---")
    assert "out of memory: Worker task 0" in one and "killed by the kernel for memory" in one
    assert "trained on 4 workers" in four, four
    peaks = [float(v) for v in re.search(r"worker peaks \(GiB\): ([0-9., ]+) of", four)
             .group(1).split(", ")]
    assert len(peaks) == 4 and max(peaks) < 1.25, peaks
