"""Memory-capped workers: a model too big for one worker is killed for memory and says so; four
workers with the same cap train it, equal to plain `model.fit`.

Each `tfpipe worker` runs in its own cgroup v1 memory group capped at `CAP`
(benchmarks/cgroups.py; the kernel SIGKILLs a worker over its cap). The model is an MLP of 8 x
Dense(3072, relu) + Dense(10) on 256 inputs with Adam: 66M parameters, about 1.06 GB of
weights, Adam slots and gradients. The client runs in its own process, uncapped
(tests/scripts/memory_cap_client.py).

- One worker: `tfpipe.fit` of the whole model on it (no watchdog). The kernel kills the worker
  (exit by SIGKILL, the group's `memory.failcnt` > 0 and its `oom_kill` count 1), and the client
  ends within a bound with `WorkerOutOfMemoryError` naming the worker, its stage, the cap and
  "killed by the kernel for memory" (its sentinel's report), not with TensorFlow's bare
  `UnavailableError: Socket closed`. The watchdog's own diagnosis of the same TensorFlow error,
  entering a watchdog, and waiting for the worker give the same error. The task then restarts
  on its old port: the new worker dismisses the sentinel and answers.
- Four workers, same cap, one stage each, 1F1B, 4 micro-batches: training works and the
  weights equal plain `model.fit` in the client within 1e-4 relative (per tensor: largest
  absolute difference over the largest absolute reference value).

The cap: an idle worker is charged about 0.26 GiB here (its resident size is about 0.6 GiB,
but TensorFlow's shared libraries are page cache charged elsewhere); measured on this machine
(2 CPU cores, TensorFlow 2.21, oneDNN on), one worker would need about 1.9 GiB for this model
(the same MLP at width 4096 peaked at 3.26 GiB uncapped), while with four workers the groups
peaked at 0.55 to 0.80 GiB over four runs (stage 0, with the narrow first layer, lowest).
`CAP` = 1.25 GiB sits between them with a margin of at least 0.45 GiB on each side. Measured:
the single worker killed 1.9 to 5.5 s into `tfpipe.fit` (failcnt 65 to 121, oom_kill 1, peak
= the cap); weights within 1.7e-5 relative of `model.fit`; the file runs in 40 to 45 s.

Skips, with the reason, where memory cgroups cannot be written (not Linux, cgroup v2 only, no
permission). Every worker is ended and every group removed; every wait is bounded.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import cgroups
from tests.workers import ENV
from tfpipe.health import probe

CLIENT = Path(__file__).resolve().parent / "scripts" / "memory_cap_client.py"
CAP = int(1.25 * cgroups.GIB)
MODEL = ["--width", "3072", "--layers", "8", "--batch", "64", "--steps", "2"]
CLIENT_TIMEOUT_S = 240.0
ERROR_WITHIN_S = 60.0


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[Callable[[], cgroups.CappedWorkerPool]]:
    """Makes capped worker pools; ends their workers and removes their groups afterwards."""
    reason = cgroups.unavailable()
    if reason:
        pytest.skip(reason=reason)
    pools: list[cgroups.CappedWorkerPool] = []

    def make() -> cgroups.CappedWorkerPool:
        directory = tmp_path / f"pool{len(pools)}"
        directory.mkdir()
        pools.append(cgroups.CappedWorkerPool(directory, CAP))
        return pools[-1]

    try:
        yield make
    finally:
        for pool in pools:
            pool.close()


def run_client(*args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(CLIENT), *args, *MODEL], capture_output=True,
                          text=True, timeout=CLIENT_TIMEOUT_S, env=ENV, cwd=CLIENT.parent)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    results = [line[len("RESULT "):] for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert results, (proc.stdout + proc.stderr)[-5000:]
    result: dict[str, Any] = json.loads(results[-1])
    return result


def test_one_capped_worker_is_killed_for_memory_and_the_client_says_so(capped):
    pool = capped()
    addresses, (worker,) = pool.start(1)
    address = addresses[0]
    result = run_client("oom", address)

    # The kill is real: SIGKILL, charges that hit the cap, and the kernel's OOM record.
    assert worker.proc.wait(timeout=30) == -signal.SIGKILL, "the worker was not killed"
    reading = pool.reading(0)
    assert reading.limit == CAP and reading.peak is not None and reading.peak >= CAP - 2**20
    assert reading.failcnt is not None and reading.failcnt > 0, reading
    assert reading.oom_kills in (None, 1), reading

    # The client's error says which worker, which stage, and memory, within a bound.
    assert result["error"] == "WorkerOutOfMemoryError", result
    assert result["cause"] == "UnavailableError", result
    assert (result["address"], result["task"], result["limit"], result["peak"]) == \
        (address, 0, CAP, reading.peak)
    assert result["stages"] in ([0], None), result  # None: killed while placing the model
    message = result["message"]
    assert message.startswith(f"Worker task 0 at {address} (/job:worker/replica:0/task:0; ")
    assert "was killed by the kernel for memory: its memory cgroup reached its limit of 1.2 GiB" \
        in message, message
    assert f"{reading.failcnt} charges failed at the limit" in message
    assert "schedule='1f1b'" in message and "memory_budget=" in message
    assert result["seconds_to_error"] < ERROR_WITHIN_S, result

    # The watchdog's diagnosis, a watchdog's entry and connecting: the same error.
    for how in ("watchdog_diagnosis", "watchdog_enter", "connect"):
        assert result[how] and result[how]["error"] == "WorkerOutOfMemoryError", (how, result)
        assert result[how]["address"] == address and result[how]["limit"] == CAP
    assert result["watchdog_diagnosis"]["stages"] == [0]

    print(f"one capped worker: killed {result['seconds_to_error']:.1f} s into tfpipe.fit, peak "
          f"{reading.peak / cgroups.GIB:.2f} GiB of {CAP / cgroups.GIB:.2f}, failcnt "
          f"{reading.failcnt}, oom_kill {reading.oom_kills}, stages {result['stages']}")

    # Restarting the task on its port dismisses the sentinel; the new worker answers.
    assert probe(address, 5.0).startswith("status call failed: RESOURCE_EXHAUSTED")
    pool.restart(addresses, 0)
    assert probe(address, 10.0) is None


def test_four_capped_workers_train_it_equal_to_model_fit(capped):
    pool = capped()
    addresses, workers = pool.start(4)
    started = time.monotonic()
    result = run_client("fit", ",".join(addresses))
    readings = [pool.reading(task) for task in range(4)]
    peaks = [r.peak or 0 for r in readings]
    figures = (f"cap {CAP / cgroups.GIB:.2f} GiB, peaks "
               f"{' / '.join(f'{p / cgroups.GIB:.2f}' for p in peaks)} GiB, failcnt "
               f"{[r.failcnt for r in readings]}, client {time.monotonic() - started:.0f} s")
    assert all(w.proc.poll() is None for w in workers), figures
    assert all(r.oom_kills in (None, 0) for r in readings), figures
    assert max(peaks) < CAP, figures
    assert result["stage_devices"] == [f"/job:worker/replica:0/task:{t}/device:CPU:0"
                                       for t in range(4)]
    worst = max(result["relative_diffs"])
    assert worst < 1e-4, f"weights differ from model.fit by {worst:.2e} relative; {figures}"
    print(f"four capped workers: {figures}; weights within {worst:.1e} relative of model.fit")
