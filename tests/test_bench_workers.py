"""Smoke test of benchmarks/workers.py (quick mode).

It checks that the script runs end to end, ends every process it starts and writes its rows;
no timing is asserted (performance targets are never asserted in unit tests).
benchmarks/peer_torch.py needs the optional `bench` extra (PyTorch), which the test
environment does not install, so it is exercised by running the benchmark, not here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from benchmarks.speed_table import stage_bounds
from tests.workers import ENV, ROOT, gone
from tfpipe.processes import nth_core


def _run(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc


def test_workers_benchmark_quick(tmp_path):
    out = tmp_path / "workers.json"
    proc = _run("workers.py", "--quick", "--schedules", "1f1b", "--micro-batches", "2",
                "--batch", "128", "--rank-loops", "both", "--timeline", "--json", str(out))
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {(r["config"], r["M"]) for r in rows} == {
        ("baseline", 1), ("model.fit", 1), ("sequential", 2), ("1f1b", 2), ("1f1b+loops", 2)}
    assert report["setup"]["rank_loops"] == ["1f1b+loops M=2"]  # the others unrolled
    assert report["worker_cores"] == [[nth_core(0)], [nth_core(1)]]  # one-core workers
    loops = next(r for r in rows if r["config"] == "1f1b+loops")
    assert loops["sequential_ms"] == next(r["ms"] for r in rows if r["config"] == "sequential")
    assert "feeding a 128x1024 batch" in proc.stdout
    # TensorFlow alone, whole and in M = 2 pieces, and the bound that leaves
    tf_alone = report["times_ms"]["tfpipe"]
    assert all(len(tf_alone[f"probe:tf M={m}"]) == 2 and min(tf_alone[f"probe:tf M={m}"]) > 0
               for m in (1, 2))
    assert re.search(r"\[tf alone\].* M=2: \d\.\d{3}x, bound \d\.\d\d", proc.stdout)
    assert all(r["ms"] > 0 and r["runs"] == 2 for r in rows)  # 2 rounds x 1 run
    piped = next(r for r in rows if r["config"] == "1f1b")
    assert piped["bound"] == pytest.approx(4 / 3)
    assert piped["comm_ms"] is not None and piped["sequential_ms"] is not None
    assert piped["efficiency_vs_sequential"] == pytest.approx(
        piped["sequential_ms"] / piped["ms"] / piped["bound"])
    assert [len(s) for s in report["setup"]["stage_layers"]] == [4, 5]
    assert report["setup"]["model_fit_kernel_device"].endswith("task:0/device:CPU:0")
    # CPU accounting: per visit, cores busy of worker 0, worker 1 and the client
    cpu = report["cpu"]
    assert set(cpu) == {"baseline", "model.fit", "sequential M=2", "1f1b M=2", "1f1b+loops M=2"}
    assert all(len(visits) == 2 and all(len(v) == 3 and min(v) >= 0 for v in visits)
               for visits in cpu.values())
    assert cpu["1f1b M=2"][0][1] > 0 and cpu["baseline"][0][0] > 0  # the workers computed
    assert "[cpu] cores busy" in proc.stdout
    assert all(t == {"train": 1} for t in report["traces"].values()), report["traces"]
    assert [t["config"] for t in report["timeline"]] == [
        "sequential M=2", "1f1b M=2, 1 worker", "1f1b M=2"]
    assert all(t["tail_ms"] is not None and t["span_ms"] > 0 for t in report["timeline"])
    [stage] = report["stage_bounds"]  # 1f1b M=2 from its one-worker twin
    assert (stage["config"], stage["M"]) == ("1f1b", 2) and stage["bound_ms"] > 0
    assert "[stage bound]" in proc.stdout
    assert "1f1b" in proc.stdout and "[summary] tfpipe" in proc.stdout
    assert "1F1B (rank loops) efficiency vs same-M sequential" in proc.stdout
    # two workers and the client, all ended
    assert len(report["processes"]["pids"]) == 3
    assert all(gone(pid) for pid in report["processes"]["pids"])


def test_stage_bounds_scale_the_one_worker_span_by_the_profiling_cost():
    """A literal table: the one-worker twin's span (300 ms, profiled) scaled by the sequential
    step's unprofiled / profiled time (540 / 600), against the baseline and the same-M
    sequential step; configurations without a twin give no row."""
    timelines = [{"config": "sequential M=4", "wall_ms": 600.0, "predicted_span_ms": 600.0},
                 {"config": "1f1b M=4, 1 worker", "wall_ms": 610.0, "predicted_span_ms": 300.0},
                 {"config": "1f1b M=4", "wall_ms": 420.0, "predicted_span_ms": 310.0},
                 {"config": "gpipe M=4", "wall_ms": 430.0, "predicted_span_ms": 320.0}]
    times = {"baseline": [500.0, 520.0, 510.0], "sequential M=4": [540.0],
             "1f1b M=4": [360.0, 380.0], "gpipe M=4": [400.0]}
    [row] = stage_bounds(timelines, times)
    assert (row["config"], row["M"]) == ("1f1b", 4)
    assert row["scale"] == pytest.approx(0.9) and row["bound_ms"] == pytest.approx(270.0)
    assert row["measured_ms"] == pytest.approx(370.0)
    assert row["speedup_bound"] == pytest.approx(510 / 270)
    assert row["speedup"] == pytest.approx(510 / 370)
    assert row["efficiency_vs_sequential_bound"] == pytest.approx(540 / 270 / 1.6)
    assert row["of_bound"] == pytest.approx(270 / 370)


def test_send_delay_reproduces_the_one_thread_send_and_its_fix():
    """benchmarks/send_delay.py, the TensorFlow-only reproduction for upstream: with one
    inter-op thread a busy worker sends only once idle, with two while it computes. If
    TensorFlow changes this, the first half fails, and `tfpipe.cluster`'s extra inter-op
    thread may go."""
    proc = _run("send_delay.py", "--runs", "2", timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("inter-op")]
    assert len(lines) == 4, proc.stdout
    assert all(line.endswith("sent once idle") for line in lines[:2]), lines
    assert all(line.endswith("sent while computing") for line in lines[2:]), lines

