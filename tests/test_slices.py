"""benchmarks/slices.py: its helpers set every thread's scheduler slice and keep its nice, and
the script runs end to end (smoke, `--quick`: no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from benchmarks import slices
from tests.workers import ENV, ROOT

if not slices.slices(os.getpid()):
    pytest.skip(reason="this kernel shows no scheduler slices (se.slice in /proc/PID/task/TID/sched, "
                "Linux 6.6+): nothing for benchmarks/slices.py to set", allow_module_level=True)


def test_set_slices_sets_every_thread_and_keeps_its_nice():
    default = slices.slices(os.getpid())[threading.get_native_id()]
    own_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    started, done = threading.Event(), threading.Event()
    tid: list[int] = []

    def niced() -> None:
        tid.append(threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, tid[0], 5)
        started.set()
        done.wait(30)

    thread = threading.Thread(target=niced)
    thread.start()
    try:
        started.wait(30)
        assert slices.set_slices(os.getpid(), 200_000) is None
        now = slices.slices(os.getpid())
        assert now and set(now.values()) == {200_000}, now
        assert os.getpriority(os.PRIO_PROCESS, tid[0]) == 5  # nice kept
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own_nice
        later: list[int] = []
        child = threading.Thread(
            target=lambda: later.append(slices.slices(os.getpid())[threading.get_native_id()]))
        child.start()
        child.join(30)
        assert later == [200_000]  # a thread made afterwards inherits it
    finally:
        done.set()
        thread.join(30)
        assert slices.set_slices(os.getpid(), default) is None
    assert slices.slices(os.getpid())[threading.get_native_id()] == default


def test_the_slices_benchmark_quick(tmp_path):
    out = tmp_path / "slices.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "slices.py"), "--quick",
                           "--json", str(out)], capture_output=True, text=True, timeout=600,
                          env=ENV, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    report = json.loads(out.read_text())
    # `tfpipe worker` keeps the kernel's default slice (the short one changed no step time)
    assert report["worker_slices_at_start"] == [[report["default_slice_ns"]]] * 2
    assert report["default_slice_ns"] > slices.SHORT_SLICE_NS
    for label in ("default", "0.1 ms"):
        times = report["times_ms"][label]
        assert set(times) == {"hop idle", "hop busy", "sequential", "pipeline"}
        assert all(len(v) == 2 and min(v) > 0 for v in times.values()), times  # 2 rounds
    assert "hop busy" in proc.stdout and "0.1 ms" in proc.stdout
