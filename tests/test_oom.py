"""Out of memory as a clear error (`tfpipe.oom`, `WorkerOutOfMemoryError`), in this process.

- A worker's report, served by the real sentinel code (`tfpipe.sentinel.serve`, a real gRPC
  server on a real port, here in a thread): a failed step's `UnavailableError` becomes
  `WorkerOutOfMemoryError` naming the worker, its stages, the limit and the peak, also when the
  report appears only a moment after the step failed (the sentinel binds once the worker is
  gone); `tfpipe.Watchdog`'s own diagnosis and its entry give the same class, and waiting for
  the worker (`tfpipe.cluster`'s first step) raises it at once instead of timing out.
- A GPU that runs out of memory fails a step with `ResourceExhaustedError` naming the device;
  no GPU here, so the mapping is checked on TensorFlow's own error class carrying the text its
  allocator writes (a real CPU allocator failure is case "a stage's device out of memory" of
  tests/error_cases.py). Other errors pass unchanged.
- The error type: both a `WorkerUnavailableError` and a `PipelineError`; it pickles.
- Cgroup v2 files (this machine has v1, read for real in tests/test_sentinel.py and
  tests/test_memory_cap.py): a folder laid out as the kernel lays out v2 groups.

The real thing end to end (a `tfpipe worker` the kernel kills in a capped cgroup) is
tests/test_memory_cap.py.
"""

from __future__ import annotations

import importlib
import pickle
import threading
import time
from types import SimpleNamespace

import pytest
import tensorflow as tf

import tfpipe
from tests.workers import free_port
from tfpipe import memory_cgroup, oom, oom_report, sentinel

cluster_module = importlib.import_module("tfpipe.cluster")
GIB = 2**30

REPORT = dict(task=1, pid=4242, scope="cgroup", limit=int(1.25 * GIB), peak=int(1.25 * GIB),
              failcnt=80, oom_kills=1, resident_peak=GIB, cgroup="/sys/fs/cgroup/memory/x")


def stages(*devices: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(index=i, device=d) for i, d in enumerate(devices)]


class Serving:
    """The sentinel's server for `report` on a free port, in a thread (after `delay_s`)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.port = free_port()
        self.address = f"localhost:{self.port}"
        self.report = oom_report.OomReport(address=self.address, **REPORT)
        self.thread = threading.Thread(target=self._serve, args=(delay_s,), daemon=True)

    def _serve(self, delay_s: float) -> None:
        time.sleep(delay_s)
        sentinel.serve(self.report, self.port, 30.0)

    def __enter__(self) -> Serving:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        deadline = time.monotonic() + 10
        while self.thread.is_alive() and time.monotonic() < deadline:
            sentinel.dismiss(self.port)
            self.thread.join(0.2)
        assert not self.thread.is_alive()


def socket_closed() -> tf.errors.UnavailableError:
    return tf.errors.UnavailableError(None, None, "Socket closed")


# a worker killed for memory -------------------------------------------------------------------


@pytest.mark.parametrize("delay_s", [0.0, 0.5])
def test_a_step_failed_on_a_worker_its_sentinel_reports_becomes_out_of_memory(delay_s):
    healthy = f"localhost:{free_port()}"  # nothing there: unreachable too, and never reports
    with Serving(delay_s) as killed:
        addresses = [healthy, killed.address]
        layout = stages(*[f"/job:worker/replica:0/task:{t}/device:CPU:0" for t in (0, 1, 1)])
        started = time.monotonic()
        err = oom.diagnose(socket_closed(), layout, addresses)
        took = time.monotonic() - started
    assert isinstance(err, tfpipe.WorkerOutOfMemoryError)
    assert (err.address, err.task, err.stages) == (killed.address, 1, (1, 2))
    assert (err.limit, err.peak) == (REPORT["limit"], REPORT["peak"])
    message = str(err)
    for words in (f"Worker task 1 at {killed.address} (/job:worker/replica:0/task:1; pipeline "
                  "stages 1, 2) was killed by the kernel for memory: its memory cgroup reached "
                  "its limit of 1.2 GiB (peak 1.2 GiB", "The step failed with UnavailableError: "
                  "Socket closed", "schedule='1f1b'", "recompute=", "micro_batches",
                  "memory_budget=", f"--cluster {','.join(addresses)} --task 1"):
        assert words in message, message
    assert took < oom.REPORT_WAIT_S + 2.0


def test_no_report_leaves_the_error_alone_within_the_wait():
    gone_worker = f"localhost:{free_port()}"
    started = time.monotonic()
    assert oom.diagnose(socket_closed(), None, [gone_worker], wait_s=0.5) is None
    assert time.monotonic() - started < 3.0
    assert oom.diagnose(tf.errors.InvalidArgumentError(None, None, "x"), None, [gone_worker]) \
        is None  # not a lost worker: nobody is asked
    too_big = tf.errors.ResourceExhaustedError(None, None, "Received message larger than max "
                                               "(2147483648 vs. 2147483647)")  # gRPC's, not memory
    assert oom.diagnose(too_big, None, []) is None
    with pytest.raises(tf.errors.UnavailableError):
        with oom.memory_errors():  # no cluster in this process
            raise socket_closed()
    with pytest.raises(KeyError):
        with oom.memory_errors():
            raise KeyError("not TensorFlow's")


def test_watchdog_and_connecting_give_the_same_error():
    with Serving() as killed:
        dog = tfpipe.Watchdog([killed.address], timeout_s=2.0,
                              stages_by_address={killed.address: [0, 1]})
        diagnosed = dog._diagnose(socket_closed())  # noqa: SLF001 (the watchdog's own diagnosis)
        assert isinstance(diagnosed, tfpipe.WorkerOutOfMemoryError)
        assert (diagnosed.address, diagnosed.stages) == (killed.address, (0, 1))
        assert "pipeline stages 0, 1) was killed by the kernel for memory" in str(diagnosed)
        with pytest.raises(tfpipe.WorkerOutOfMemoryError, match="killed by the kernel for memory"):
            with tfpipe.Watchdog([killed.address], timeout_s=2.0):
                raise AssertionError("the block must not run")
        started = time.monotonic()
        with pytest.raises(tfpipe.WorkerOutOfMemoryError, match=f"at {killed.address}"):
            cluster_module.wait_for_workers([killed.address], 30.0)
        assert time.monotonic() - started < 5.0  # at once, not after the 30 s


# a device that runs out of memory -------------------------------------------------------------


def allocator_error(device: str) -> tf.errors.ResourceExhaustedError:
    return tf.errors.ResourceExhaustedError(
        None, None, "Graph execution error:\n\nDetected at node stage2_F0/dense/MatMul\nOOM when "
        f"allocating tensor with shape[64,16384] and type float on {device} by allocator "
        "GPU_0_bfc\n\t [[{{node stage2_F0/dense/MatMul}}]]")


def test_a_gpu_out_of_memory_on_a_worker_names_the_worker_device_and_stages():
    addresses = [f"h{t}:2222" for t in range(4)]
    layout = stages(*[f"/job:worker/replica:0/task:{t}/device:GPU:0" for t in range(4)])
    device = "/job:worker/replica:0/task:2/device:GPU:0"
    err = oom.diagnose(allocator_error(device), layout, addresses)  # no worker is asked
    assert err is not None
    assert (err.address, err.task, err.stages, err.device) == ("h2:2222", 2, (2,), device)
    assert str(err).startswith(f"Worker task 2 at h2:2222 ({device}; pipeline stage 2) ran out "
                               "of memory: OOM when allocating tensor with shape[64,16384]")
    assert "schedule='1f1b'" in str(err)
    # What a Watchdog knows (stage indices by worker) names the same stage.
    held = oom.worker_stages({"h2:2222": [2], "h3:2222": [3]}, addresses)
    assert oom.device_error(str(allocator_error(device)), held, addresses).stages == (2,)


def test_a_local_gpu_out_of_memory_names_the_device_and_its_stages():
    layout = stages("/device:GPU:0", "/device:GPU:1", "/device:GPU:1")
    with pytest.raises(tfpipe.WorkerOutOfMemoryError) as info:
        with oom.memory_errors() as scope:
            scope.stages = layout  # known once the pipeline exists
            raise allocator_error("/job:localhost/replica:0/task:0/device:GPU:1")
    err = info.value
    assert isinstance(err.__cause__, tf.errors.ResourceExhaustedError)
    assert (err.task, err.stages, err.device) == \
        (None, (1, 2), "/job:localhost/replica:0/task:0/device:GPU:1")
    assert str(err).startswith("Device /job:localhost/replica:0/task:0/device:GPU:1 (pipeline "
                               "stages 1, 2) ran out of memory")


# the error type, the report, cgroup v2 files ---------------------------------------------------


def test_worker_out_of_memory_error_is_both_kinds_and_pickles():
    err = tfpipe.WorkerOutOfMemoryError("m", address="a:1", task=1, stages=(1,), reason="r",
                                        device="/device:GPU:0", limit=5, peak=6)
    assert isinstance(err, tfpipe.WorkerUnavailableError) and isinstance(err, tfpipe.PipelineError)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is tfpipe.WorkerOutOfMemoryError
    assert (str(back), back.address, back.task, back.stages, back.reason, back.device, back.limit,
            back.peak) == ("m", "a:1", 1, (1,), "r", "/device:GPU:0", 5, 6)


def test_report_text_parses_back_wherever_it_ends_up():
    report = oom_report.OomReport(address="h:1", **REPORT)
    text = report.text()
    assert text.splitlines()[0].startswith("tfpipe worker task 1 at h:1 (pid 4242) was killed by "
                                           "the kernel for memory")
    assert oom_report.parse(text) == report
    assert oom_report.parse(f"status call failed: RESOURCE_EXHAUSTED {text}; the step failed "
                            "with UnavailableError: x") == report
    assert oom_report.parse("unreachable (connection refused)") is None
    assert oom_report.parse(oom_report.MARK + "{not json") is None
    system = oom_report.OomReport(task=0, address="h:1", pid=1, scope="system")
    assert system.summary().startswith("killed by the kernel for memory, it seems")


def test_cgroup_v2_files_are_read(tmp_path):
    parent = tmp_path / "workers"
    group = parent / "task0"
    group.mkdir(parents=True)
    (parent / "memory.max").write_text("1073741824\n")
    for name, text in (("memory.max", "max\n"), ("memory.current", "123\n"),
                       ("memory.peak", "1073741824\n"),
                       ("memory.events", "low 0\nhigh 0\nmax 17\noom 1\noom_kill 1\n")):
        (group / name).write_text(text)
    reading = memory_cgroup.read(group, 2)
    assert (reading.limit, reading.usage, reading.peak, reading.failcnt, reading.oom_kills) == \
        (GIB, 123, GIB, 17, 1)  # the limit is the parent's: the group's own is "max"
