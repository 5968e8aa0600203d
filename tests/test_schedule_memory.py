"""Measured memory direction: 1F1B's allocator peak is below GPipe's (no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_one_f_one_b_peak_below_gpipe(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "schedule_memory.py"), "--stages", "4",
         "--micro-batches", "8", "--batch", "4096", "--width", "256", "--layers", "8",
         "--repeats", "1", "--schedules", "gpipe,1f1b", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = {r["schedule"]: r["peak_mib"] for r in json.loads(out.read_text())["results"]}
    assert 0 < peaks["1f1b"] < peaks["gpipe"], peaks
