"""Smoke test of benchmarks/worker_memory.py (quick mode: 2 `tfpipe worker` processes).

It checks that the script runs end to end, ends the workers it starts and reports a figure
for every stage of every configuration; the figures' values are never asserted beyond
sanity (performance and memory targets are not asserted in unit tests).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.workers import ENV, ROOT, gone

CONFIGS = ["gpipe:never", "1f1b:never", "1f1b:except_last", "1f1b:always", "gpipe:always"]


def test_worker_memory_benchmark_quick(tmp_path):
    out = tmp_path / "worker_memory.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "worker_memory.py"), "--quick",
         "--timeout", "240", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    report = json.loads(out.read_text())
    assert report["args"]["stages"] == 2
    assert report["measure"] == "peak RSS (VmHWM)"
    assert len(report["calibration_mib"]) == 2
    results = report["results"]
    assert [r["config"] for r in results] == CONFIGS
    for r in results:
        assert len(r["peak_mib"]) == len(r["baseline_mib"]) == len(r["model_mib"]) == 2
        assert all(p > 0 for p in r["peak_mib"]), r
        assert all(b > 0 for b in r["baseline_mib"]), r
        assert len(r["in_flight"]) == 2 and r["step_s"] > 0
    assert results[0]["ratio"] == [1.0, 1.0]
    assert "stage 1" in proc.stdout and "1f1b:except_last" in proc.stdout
    assert all(gone(pid) for pid in report["processes"]["pids"])
