"""Smoke test of benchmarks/plan_accuracy.py (quick mode).

It checks that the script runs end to end on two worker processes, ends every process it
starts, and writes a predicted and a measured step time for every configuration; no timing
and no accuracy is asserted (performance targets are never asserted in unit tests).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.workers import ENV, ROOT, gone


def test_plan_accuracy_quick(tmp_path):
    out = tmp_path / "plan_accuracy.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plan_accuracy.py"), "--quick",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [r["rank"] for r in rows if r["source"] == "top"] == [1, 2, 3]
    assert any(r["kwargs"]["stages"] == 1 for r in rows)  # the 1-stage baseline
    for r in rows:
        assert r["predicted_ms"] > 0 and r["measured_ms"] > 0, r
        assert r["runs"] == 2  # 2 rounds x 1 run
        assert math.isclose(r["ratio"], r["measured_ms"] / r["predicted_ms"])
    assert report["best"]["label"] == rows[0]["label"]
    assert "Plan for 'mlp'" in proc.stdout and "[best] plan.best" in proc.stdout
    # measured between the two worker processes: a hop has a latency and a finite bandwidth
    assert report["plan"]["latency_ms"] > 0 and 0 < report["plan"]["bandwidth"] < math.inf
    assert "ms per hop between devices" in report["plan"]["table"]
    # two workers and the client, all ended
    assert len(report["processes"]["pids"]) == 3
    assert all(gone(pid) for pid in report["processes"]["pids"])
