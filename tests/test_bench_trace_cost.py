"""Smoke test of benchmarks/trace_cost.py with the steady loop: it runs end to end and writes
its rows; no timing is asserted (performance targets are never asserted in unit tests)."""

from __future__ import annotations

import json

from tests.test_bench_workers import _run


def test_trace_cost_runs_the_steady_loop_beside_the_unrolled_step(tmp_path):
    out = tmp_path / "trace.json"
    proc = _run("trace_cost.py", "--model", "transformer", "--blocks", "2", "--width", "16",
                "--stages", "2", "--micro-batches", "4", "--rank-loops", "steady",
                "--steady-rounds", "1", "--json", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert row["step"] == "steady loop" and row["K"] == 2 and row["M"] == 4
    assert row["calls"] == 1 and row["trace_s"] > 0 and row["first_run_s"] > 0
    assert set(row["steady_side_by_side_s"]) == {"steady loop", "unrolled"}
    assert "steady side by side (1 fits each): steady loop" in proc.stdout
