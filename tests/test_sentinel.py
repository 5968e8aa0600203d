"""The out-of-memory sentinel (`tfpipe.sentinel`) against real kernel kills and real `tfpipe worker`s.

- A stand-in worker (tests/scripts/memory_hog.py, no TensorFlow, so each case takes about a
  second) starts the real sentinel, in a real memory cgroup capped at 64 MiB
  (benchmarks/cgroups.py), and allocates until the kernel SIGKILLs it. The sentinel then
  answers TensorFlow's status call on the worker's port with RESOURCE_EXHAUSTED and its report
  (limit, peak, failcnt and oom_kill equal to the cgroup's own files), and stops when a new
  worker asks it to leave, when its time to live ends, or on SIGTERM.
- A worker that dies for another reason (SIGKILL from us, a normal exit): the sentinel exits
  at once and prints nothing; it is small and loads no TensorFlow.
- Beside a real `tfpipe worker`: the sentinel is the worker's child and ends with it;
  `--oom-report-s 0` starts none; `--gpu I` sets `CUDA_VISIBLE_DEVICES` before TensorFlow
  lists its devices (on a machine without a GPU: a one-line error naming it).

Cases that need a memory cgroup skip, with the reason, where none can be written (not Linux,
cgroup v2 only, no permission). Every process is ended and every group removed; every wait is
bounded.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import cgroups
from tests.workers import ENV, WorkerPool, free_port, gone
from tfpipe import cli, memory_cgroup, oom_report, sentinel
from tfpipe.health import probe
from tfpipe.processes import Lines, ProcessGroup

HOG = Path(__file__).resolve().parent / "scripts" / "memory_hog.py"
CAP = 64 * 2**20
_groups = itertools.count()


@pytest.fixture
def capped_group() -> Iterator[Path]:
    """A memory cgroup capped at CAP, removed afterwards (skips, saying why, where impossible)."""
    reason = cgroups.unavailable()
    if reason:
        pytest.skip(reason=reason)
    group = cgroups.make_group(cgroups.parent_group(),
                               f"tfpipe-{os.getpid()}-sentinel{next(_groups)}", CAP)
    try:
        yield group
    finally:
        cgroups.remove_group(group)


def start_hog(processes: ProcessGroup, port: int, ttl_s: float,
              group: Path | None = None) -> tuple[subprocess.Popen[str], int]:
    """The stand-in worker (in `group`, if given) and its sentinel's pid, once both run."""
    launcher = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs")] \
        if group is not None else []
    hog = processes.spawn([*launcher, sys.executable, str(HOG), str(port), str(ttl_s)],
                          "hog.log", stdin=True)
    word, pid = Lines(hog, processes.dir / "hog.log").next(60, "memory_hog").split()
    assert word == "ready"
    return hog, int(pid)


def ended(pid: int) -> bool:
    """Whether a process is gone or a zombie (exited, not yet reaped by its new parent)."""
    try:
        return gone(pid) or Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_until(condition, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"{what}: not within {timeout_s} s")
        time.sleep(0.02)
    return time.monotonic() - started


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def loads_tensorflow(pid: int) -> bool:
    return "tensorflow" in Path(f"/proc/{pid}/maps").read_text()


# a stand-in worker, killed for memory --------------------------------------------------------


@pytest.mark.parametrize("ending", ["a new worker asks it to leave", "time to live", "SIGTERM"])
def test_sentinel_reports_a_kill_for_memory_on_the_port_until_it_is_told_to_go(
        capped_group, tmp_path, ending):
    port = free_port()
    address = f"localhost:{port}"
    ttl_s = 2.0 if ending == "time to live" else 60.0
    with ProcessGroup(tmp_path) as processes:
        hog, guard = start_hog(processes, port, ttl_s, capped_group)
        assert sorted(cgroups.procs(capped_group)) == sorted([hog.pid, guard])  # it inherited it
        assert probe(address, 2.0).startswith("unreachable")  # nothing serves there yet
        assert hog.stdin is not None
        hog.stdin.write("hog\n")
        hog.stdin.flush()
        assert hog.wait(timeout=30) == -signal.SIGKILL  # killed by the kernel, for real
        dead = time.monotonic()
        wait_until(lambda: not probe(address, 1.0).startswith("unreachable"), 10, "the report")
        bound_s = time.monotonic() - dead
        reason = probe(address, 2.0)
        assert reason.startswith("status call failed: RESOURCE_EXHAUSTED tfpipe worker task 0 at "
                                 f"{address} (pid {hog.pid}) was killed by the kernel for memory"), reason
        report = oom_report.parse(reason)
        reading = memory_cgroup.read(capped_group, 1)
        assert report is not None and (report.task, report.address, report.pid, report.scope) == \
            (0, address, hog.pid, "cgroup")
        assert report.limit == reading.limit == CAP
        assert report.peak == reading.peak and report.peak > CAP - 2**20
        assert report.failcnt == reading.failcnt and report.failcnt > 0
        assert report.oom_kills == reading.oom_kills == 1
        assert report.cgroup == str(capped_group)
        assert f"limit of {CAP >> 20}.0 MiB" in reason
        assert bound_s < 2.0, f"the report came {bound_s:.2f} s after the worker died"

        if ending == "a new worker asks it to leave":
            assert sentinel.dismiss(port) and sentinel.port_free(port)
        elif ending == "SIGTERM":
            os.kill(guard, signal.SIGTERM)
        wait_until(lambda: ended(guard), ttl_s + 10, "the sentinel's exit")
        assert probe(address, 2.0).startswith("unreachable")
        assert sentinel.port_free(port)
    log = (tmp_path / "hog.log").read_text()
    assert f"tfpipe sentinel: reporting it on port {port} for up to {ttl_s:.0f} s" in log


def test_dismiss_leaves_a_port_alone_when_no_sentinel_serves_it():
    port = free_port()
    assert sentinel.dismiss(port) is False  # free: nothing to ask
    import socket

    with socket.create_server(("localhost", 0)) as taken:  # something else holds the port
        started = time.monotonic()
        assert sentinel.dismiss(taken.getsockname()[1]) is False
        assert time.monotonic() - started < 3.0


# a stand-in worker that dies for another reason ---------------------------------------------


@pytest.mark.parametrize("death", ["SIGKILL", "exit"])
def test_sentinel_exits_quietly_when_the_worker_dies_otherwise(tmp_path, death):
    port = free_port()
    with ProcessGroup(tmp_path) as processes:
        hog, guard = start_hog(processes, port, 60.0)
        assert children(hog.pid) == [guard]
        rss = int(next(line.split()[1] for line in
                       Path(f"/proc/{guard}/status").read_text().splitlines()
                       if line.startswith("VmRSS:"))) * 1024
        assert not loads_tensorflow(guard) and rss < 100 * 2**20, rss  # small: stdlib + gRPC
        if death == "SIGKILL":
            os.kill(hog.pid, signal.SIGKILL)
            assert hog.wait(timeout=10) == -signal.SIGKILL
        else:
            assert hog.stdin is not None
            hog.stdin.close()
            assert hog.wait(timeout=10) == 0
        took = wait_until(lambda: ended(guard), 5, "the sentinel's exit")
        assert probe(f"localhost:{port}", 2.0).startswith("unreachable")
    assert "tfpipe" not in (tmp_path / "hog.log").read_text()
    assert took < 3.0


# beside a real tfpipe worker ------------------------------------------------------------------


def test_worker_runs_its_sentinel_as_a_child_that_ends_with_it(tmp_path):
    (tmp_path / "quiet").mkdir()
    pool = WorkerPool(tmp_path)
    quiet = WorkerPool(tmp_path / "quiet", args=["--oom-report-s", "0"])
    try:
        addresses, (worker,) = pool.start(1)
        _, (silent,) = quiet.start(1)
        (guard,) = children(worker.proc.pid)
        command = Path(f"/proc/{guard}/cmdline").read_text().rstrip("\0").split("\0")
        assert "from tfpipe.sentinel import main" in command[2]
        assert command[3:] == ["--pid", str(worker.proc.pid), "--port",
                               addresses[0].rsplit(":", 1)[1], "--address", addresses[0],
                               "--ttl", "600.0", "--task", "0"]
        assert not loads_tensorflow(guard) and loads_tensorflow(worker.proc.pid)
        assert children(silent.proc.pid) == []  # --oom-report-s 0: no sentinel
        assert probe(addresses[0], 10.0) is None  # the worker itself answers

        os.kill(worker.proc.pid, signal.SIGTERM)
        assert worker.proc.wait(timeout=15) == 0
        wait_until(lambda: ended(guard), 5, "the sentinel's exit with its worker")
    finally:
        pool.stop_all()
        quiet.stop_all()


@pytest.mark.parametrize("args, words", [
    (["--gpu", "-1"], "argument --gpu: must be a non-negative integer, got '-1'"),
    (["--oom-report-s", "soon"], "argument --oom-report-s: must be a number of seconds >= 0"),
])
def test_worker_option_usage_errors(capsys, args, words):
    with pytest.raises(SystemExit) as info:
        cli.main(["worker", "--cluster", "localhost:1", "--task", "0", *args])
    assert info.value.code == cli.EXIT_USAGE
    assert words in capsys.readouterr().err


def test_worker_gpu_sets_cuda_visible_devices_before_tensorflow_lists_devices(tmp_path):
    """What can be checked without a GPU: `--gpu 0` reaches TensorFlow as CUDA_VISIBLE_DEVICES=0
    before it lists its devices, and a machine where it then sees no GPU gets one line naming the
    index and the variable (exit status 1), not a worker silently on the CPU."""
    import tensorflow as tf

    address = f"localhost:{free_port()}"
    if tf.config.list_physical_devices("GPU"):
        pool = WorkerPool(tmp_path, args=["--gpu", "0"])
        try:
            pool.start(1)
            assert "tfpipe worker 0: GPU 0 (CUDA_VISIBLE_DEVICES=0) as /device:GPU:0, memory " \
                "growth on" in (tmp_path / "worker0.log").read_text()
        finally:
            pool.stop_all()
        return
    proc = subprocess.run([sys.executable, "-m", "tfpipe", "worker", "--cluster", address,
                           "--task", "0", "--gpu", "0"], capture_output=True, text=True,
                          timeout=120, env=ENV, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tfpipe")]
    assert len(lines) == 1 and lines[0].startswith(
        "tfpipe worker: error: --gpu 0: GPU 0 was asked for (CUDA_VISIBLE_DEVICES=0), but "
        "TensorFlow sees no GPU: check the index"), lines
    assert proc.stdout == ""  # never ready
