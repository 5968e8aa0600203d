"""Smoke test of benchmarks/traffic.py: four real `tfpipe worker` processes, small sizes.

It checks that the script runs end to end (its `WorkerPool` ends the workers) and reports
every optimizer on two workers, and Adam with `replicas=2` on four.
Loopback counts whatever else the machine sends meanwhile (other tests run beside this one),
so the loopback figure is only checked to be at least the least needed; the placed bytes,
read from the step's partition graphs on the workers, are exact and held to 1.05x the least.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.workers import ENV, ROOT


def test_traffic_benchmark_quick(tmp_path):
    out = tmp_path / "traffic.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "traffic.py"), "--width", "128",
         "--layers", "4", "--batch", "64", "--micro-batches", "2", "--steps", "1",
         "--optimizers", "adamw,global_clipnorm", "--replicas", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["optimizer"], r["replicas"], r["workers"]) for r in results] == [
        ("adamw", 1, 2), ("global_clipnorm", 1, 2), ("adam", 2, 4)]
    for r in results:
        assert r["loopback_mib"] >= r["least_mib"] > 0, r
        assert r["placed_ratio"] <= 1.05, r
