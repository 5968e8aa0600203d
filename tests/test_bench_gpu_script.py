"""Smoke tests of the prepared GPU run: `benchmarks/gpu.sh` and `benchmarks/gpu.py`.

No GPU here: `--cpu-smoke` runs the same code paths (one process per part, logical devices,
per-device peaks, the two halves of the memory promise) on logical CPU devices with tiny
sizes. They check that the scripts run end to end and write the report's keys; no timing or
memory figure is asserted (performance targets are never asserted in unit tests).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def test_gpu_sh_parses():
    proc = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_promise_model_does_not_fit_one_logical_gpu_but_a_quarter_does():
    from benchmarks import gpu

    for gib in (1.0, 2.0, 4.0, 8.0, 16.0):
        width = gpu.promise_width(gib, 8)
        weights = 8 * width * width * 4
        limit = gib * 2**30
        assert 3 * weights > 1.1 * limit  # weights + Adam's two slots: out of memory on one
        assert 5 / 4 * weights / 4 < 0.6 * limit  # a quarter with Adam, grads, accumulators


def test_gpu_sh_cpu_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable,
           "TFPIPE_GPU_VENV": str(tmp_path / "no-venv"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("OUT", None)
    proc = subprocess.run([BASH, str(SCRIPT), "--cpu-smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "[gpu] summary" in proc.stdout and "exit status 0" in proc.stdout

    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-smoke"
    assert {"card", "args", "parts", "env", "warmup", "overhead", "micro_batching", "jit",
            "memory", "replicas", "promise"} <= set(report)
    assert list(report["parts"]) == ["warmup", "promise_plain", "promise_pipeline", "memory",
                                     "traffic", "speed"]
    assert all(p["status"] == "ok" for p in report["parts"].values()), report["parts"]
    assert len(report["env"]["devices"]) == 4 and report["env"]["tensorflow"]

    overhead = report["overhead"]["mlp"]
    assert {"model_fit_ms", "tfpipe_ms", "throughput_ratio", "model_fit_no_xla_ms",
            "throughput_ratio_vs_no_xla", "model_fit_jit_compile"} <= set(overhead)
    assert [r["M"] for r in report["micro_batching"]["mlp"]] == [1, 2]
    traffic = report["traffic"]  # bytes between devices per optimizer, from placed graphs
    assert set(traffic) == {"sgd", "adam", "adamw", "clipnorm", "global_clipnorm",
                            "mixed_float16"}
    for name, r in traffic.items():
        assert r["placed_ratio"] <= 1.05 and r["default_device_bytes"] <= 1024, (name, r)
    replicas = report["replicas"]  # 2 copies x 2 stages, then 4 x 1 with collectives
    assert replicas["replicas=2"]["placed_ratio"] <= 1.05, replicas
    assert replicas["replicas=4"]["status"] == "trained", replicas
    assert replicas["replicas=4"]["communication_hint"] == "auto"  # "nccl" on whole GPUs
    jit = report["jit"]["mlp"]  # per-stage XLA on and off
    assert jit["stages"] == 4 and len(jit["ms"]) == 6
    assert {"one_stage_xla_vs_model_fit_xla", "k_stages_xla_vs_no_xla"} <= set(jit)
    steady = report["steady_loop"]["transformer"]  # the steady loop beside the unrolled step
    assert (steady["K"], steady["M"]) == (4, 8) and steady["steady_vs_unrolled"] > 0
    assert set(steady["s_per_step"]) == {"steady loop", "unrolled"}

    rows = report["memory"]["rows"]
    assert [(r["schedule"], r["recompute"]) for r in rows] == [
        ("gpipe", "never"), ("1f1b", "never"), ("1f1b", "except_last"), ("1f1b", "always")]
    assert all(len(r["peak_above_rest_mib"]) == 4 and len(r["peak_mib"]) == 4 for r in rows)
    assert report["memory"]["setup"]["shared_allocator"] is True

    promise = report["promise"]
    assert {"width", "layers", "params", "weights_and_adam_mib"} <= set(promise["setup"])
    assert promise["plain"]["status"] == "trained"  # no memory limit on logical CPUs
    piped = promise["pipeline"]
    assert piped["status"] == "trained" and len(piped["losses"]) == 2
    assert len(set(piped["stage_devices"])) == 4 and len(piped["peak_mib"]) == 4
