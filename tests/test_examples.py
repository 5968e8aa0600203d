"""Smoke test: the demo trains pipelined on 4 devices, the loss falls, and it samples text."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_char_transformer_demo_runs(tmp_path):
    env = {**os.environ, "CI": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "char_transformer.py"), "--epochs", "2",
         "--steps-per-epoch", "12", "--chars", "60000", "--generate", "40", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "4 stages x 4 micro-batches" in out
    assert re.search(r"^3\s+block_3 \.\. logits \(3\)", out, re.M), out
    losses = [float(v) for v in re.findall(r"tokens/s, loss ([0-9.]+)", out)]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert "--- sampled text ---" in out and (tmp_path / "char_transformer.keras").exists()
