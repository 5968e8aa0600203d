"""Remote stages on real `tfpipe worker` processes over loopback, the watchdog, and the pieces behind them.

Worker processes are started with `python -m tfpipe worker` on free ports and always ended by
the `workers` fixture (tests/workers.py: SIGCONT, SIGTERM, then SIGKILL), also at interpreter
exit. The client side of each scenario runs in its own process (tests/cluster_client.py),
because this process has TensorFlow initialised with four logical CPU devices and must not
keep a connection to workers that are gone. Every wait is bounded.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tfpipe
from tests.workers import ENV, WorkerPool, free_port
from tfpipe import cli
from tfpipe.devices import resolve_devices
from tfpipe.processes import nth_core

cluster_module = importlib.import_module("tfpipe.cluster")  # `tfpipe.cluster` is the function
watchdog_module = importlib.import_module("tfpipe.watchdog")

CLIENT = Path(__file__).with_name("cluster_client.py")
CLIENT_TIMEOUT_S = 150.0


@pytest.fixture
def workers(tmp_path):
    """`start(n, tf_config_task=None)` starts n workers and waits until each prints ready."""
    pool = WorkerPool(tmp_path)
    try:
        yield pool.start
    finally:
        pool.stop_all()


def run_client(*args: object, expect_status: int = 0) -> tuple[dict, subprocess.CompletedProcess]:
    proc = subprocess.run([sys.executable, str(CLIENT), *map(str, args)], capture_output=True,
                          text=True, timeout=CLIENT_TIMEOUT_S, env=ENV, cwd=CLIENT.parent)
    assert proc.returncode == expect_status, (proc.stdout + proc.stderr)[-5000:]
    results = [line[len("RESULT "):] for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
    return (json.loads(results[-1]) if results else {}), proc


# real workers -----------------------------------------------------------------------------


def stopped(pid: int, timeout_s: float = 10.0) -> None:
    """Waits until process `pid` is stopped (state T in /proc/<pid>/stat), bounded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop within {timeout_s} s")


def test_worker_serves_answers_status_and_exits_0_on_sigterm_and_sigint(workers):
    addresses, (w0, w1) = workers(2, tf_config_task=1)  # task 1 reads TF_CONFIG
    assert cluster_module.probe(addresses[0], 10.0) is None
    assert cluster_module.probe(addresses[1], 10.0) is None

    os.kill(w0.proc.pid, signal.SIGSTOP)
    try:
        stopped(w0.proc.pid)  # a signal takes effect when the process next runs (a busy machine)
        # The kernel still accepts TCP connections for a stopped process ...
        with socket.create_connection(("localhost", int(addresses[0].rsplit(":", 1)[1])), 2):
            pass
        # ... but it answers no status call.
        reason = cluster_module.probe(addresses[0], 1.0)
        assert reason is not None and reason.startswith("no answer to a status call"), reason
    finally:
        os.kill(w0.proc.pid, signal.SIGCONT)
    assert cluster_module.probe(addresses[0], 10.0) is None

    for worker, sig in ((w0, signal.SIGTERM), (w1, signal.SIGINT)):
        os.kill(worker.proc.pid, sig)
        assert worker.proc.wait(timeout=15) == 0
        assert worker.next_line(5) == f"tfpipe worker {[w0, w1].index(worker)} stopping on {sig.name}"


def test_a_pinned_worker_runs_every_thread_on_its_core(tmp_path):
    pool = WorkerPool(tmp_path, pin=True)
    try:
        _, started = pool.start(2)
        for task, worker in enumerate(started):
            want = str(nth_core(task))
            tids = os.listdir(f"/proc/{worker.proc.pid}/task")
            assert len(tids) > 10  # TensorFlow's and gRPC's threads, made after pinning
            for tid in tids:
                with open(f"/proc/{worker.proc.pid}/task/{tid}/status") as f:
                    allowed = [ln.split()[1] for ln in f if ln.startswith("Cpus_allowed_list")]
                assert allowed == [want], (task, tid, allowed)
    finally:
        pool.stop_all()


def test_worker_on_a_taken_port_exits_1(tmp_path):
    with socket.create_server(("localhost", 0)) as taken:
        address = f"localhost:{taken.getsockname()[1]}"
        proc = subprocess.run([sys.executable, "-m", "tfpipe", "worker", "--cluster", address,
                               "--task", "0"], capture_output=True, text=True, timeout=120,
                              env=ENV, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tfpipe")]
    assert lines == [f"tfpipe worker: error: cannot start task 0 at {address}: Could not start "
                     "gRPC server (is the port in use, or the host not this machine?)"], lines


def test_two_stage_fit_on_two_workers_equals_model_fit(workers):
    addresses, _ = workers(2)
    result, _ = run_client("fit", ",".join(addresses))
    remote = [f"/job:worker/replica:0/task:{i}/device:CPU:0" for i in range(2)]
    assert result["devices"] == remote
    assert result["worker_devices"] == remote
    assert result["default_devices"] == remote  # not the client's CPU beside the workers'
    assert result["stage_devices"] == remote
    assert result["reference_devices"] == ["client"]

    np.testing.assert_allclose(result["losses"], result["reference_losses"], rtol=1e-5, atol=1e-6)
    assert len(result["losses"]) == 16  # 256 samples / 32, two epochs
    assert max(result["weight_diffs"]) < 1e-5, result["weight_diffs"]

    # Variables and Adam slots live on their stage's worker.
    for stage, names in enumerate(result["stage_variables"]):
        for name in names:
            assert result["variables"][name] == f"task:{stage}", name
    assert len(result["slots"]) == 10
    for name, slot_devices in result["slots"].items():
        assert slot_devices == [result["variables"][name]] * 2, (name, slot_devices)
    # Forward and backward math, and the optimizer's variable updates, run on the workers.
    ops = result["ops"]
    for kind in ("MatMul", "BiasAddGrad", "TanhGrad", "AssignSubVariableOp"):
        assert ops[kind] and set(ops[kind]) == {"task:0", "task:1"}, (kind, ops[kind])
    assert "/job:worker/replica:0/task:1/device:CPU:0" in result["summary"]
    # 1F1B M = 4 over two processes runs unrolled by default (a loop over several processes
    # synchronises them every iteration); asked for, or on one worker, the steady loop
    assert result["loops"] == ["NoneType", "SteadyLoop", "SteadyLoop"]

    # Remote names are checked against the connected cluster; partial names are accepted.
    refused = result["refused"]
    assert "not a device of the connected cluster" in refused["/job:worker/replica:0/task:7/device:CPU:0"]
    assert "does not exist" in refused["/device:CPU:3"]
    assert result["partial_stage_devices"] == ["/job:worker/task:0", "/job:worker/task:1"]


def test_a_one_thread_worker_hands_a_tensor_over_while_it_computes(workers):
    """`tfpipe.cluster(threads=1)`: one intra-op thread, two inter-op threads. With one,
    TensorFlow's executor queued worker 0's send of `a` behind the chain `b` that became
    ready with it (it ran `b` inline), so worker 1 got `a` only once worker 0 was idle; the
    next stage then idled for one forward per hand-over (docs/benchmarks.md)."""
    addresses, _ = workers(2)
    result, _ = run_client("handover", ",".join(addresses))
    assert result["threads"] == [1, 2]
    for got, started, ended in zip(result["a_on_worker1"], result["b_started"],
                                   result["b_done"]):
        assert ended - started > 0.05, result  # `b` ran: 40 products of 256 x 1024 x 1024
        assert got < ended, result  # and still ran on worker 0 when worker 1 had `a`


def test_subclassed_task_with_nested_backbone_split_on_two_workers_equals_model_fit(workers):
    addresses, _ = workers(2)
    result, _ = run_client("nested", ",".join(addresses))
    assert result["stage_names"] == [["backbone/block_0", "backbone/block_1"],
                                     ["backbone/block_2", "backbone/block_3", "head"]]
    np.testing.assert_allclose(result["losses"], result["reference_losses"], rtol=1e-5, atol=1e-6)
    assert max(result["weight_diffs"]) < 1e-5, result["weight_diffs"]
    for path, task in result["variables"].items():  # each weight on its stage's worker
        stage = 0 if any(f"block_{i}/" in path for i in (0, 1)) else 1
        assert task == f"task:{stage}", (path, task)


def test_two_replicas_of_a_two_stage_pipeline_on_four_workers_equal_model_fit(workers):
    """Pipeline x data parallel across worker processes: copy 1's gradient sums are sent to
    copy 0's workers and added there (no collective), and training equals plain model.fit."""
    addresses, _ = workers(4)
    result, _ = run_client("replicas", ",".join(addresses))
    remote = [f"/job:worker/replica:0/task:{i}/device:CPU:0" for i in range(4)]
    assert result["replica_devices"] == [remote[:2], remote[2:]]
    assert result["variables"] == ["task:0", "task:1"]  # one set of weights, on copy 0
    np.testing.assert_allclose(result["losses"], result["reference_losses"], rtol=1e-5, atol=1e-6)
    assert max(result["weight_diffs"]) < 1e-5, result["weight_diffs"]
    assert sorted(set(map(tuple, result["reduces"]))) == [("task:0", "task:2"),
                                                         ("task:1", "task:3")]
    assert not result["collectives"]


@pytest.mark.parametrize("mode, task", [("kill", 1), ("stop", 1), ("stop", 0)])
def test_failed_worker_ends_training_with_an_error_naming_it(workers, mode, task):
    """SIGKILL or SIGSTOP a stage's worker mid-training: a WorkerUnavailableError naming its
    address and stage, instead of a hang, within the watchdog's bound."""
    timeout_s = 5.0
    addresses, procs = workers(2)
    victim = procs[task]
    started = time.monotonic()
    result, proc = run_client(mode, ",".join(addresses), victim.proc.pid, timeout_s)
    assert result["error"] == "WorkerUnavailableError", result
    assert (result["address"], result["task"], result["stages"]) == (addresses[task], task, [task])
    assert addresses[task] in result["message"] and f"stage {task}" in result["message"]
    assert f"--task {task}" in result["message"]  # the fix: how to restart it
    assert result["cause"] == "UnavailableError"  # the interrupted step's own error
    assert result["batches"] >= 1
    if mode == "kill":
        assert "unreachable" in result["reason"], result["reason"]
        assert result["seconds_after_signal"] < 3.0, result
        assert victim.proc.wait(timeout=5) == -signal.SIGKILL
    else:
        assert result["reason"].startswith("no answer to a status call"), result["reason"]
        # silent for timeout_s (the last answer may predate the stop by one interval)
        assert timeout_s - 1.5 < result["seconds_after_signal"] < timeout_s + 4.0, result
        assert "Interrupting the calls waiting on it" in proc.stderr
        assert victim.proc.poll() is None  # still stopped; the fixture resumes and ends it
    assert time.monotonic() - started < CLIENT_TIMEOUT_S


def test_uninterruptible_step_ends_the_process_with_exit_status_75(workers):
    """The fallback: if closing the connections cannot end the blocked step, the watchdog
    prints the error and ends the process with EXIT_WORKER_UNAVAILABLE."""
    addresses, (_, victim) = workers(2)
    result, proc = run_client("stuck", ",".join(addresses), victim.proc.pid, 3.0, 2.0,
                              expect_status=cluster_module.EXIT_WORKER_UNAVAILABLE)
    assert result == {}  # it never got past the blocked step
    assert "SIGNALLED stuck" in proc.stdout
    assert f"tfpipe: Worker task 1 at {addresses[1]}" in proc.stderr
    assert "ending the process with exit status 75" in proc.stderr


# the pieces, in this process (no TensorFlow cluster) --------------------------------------


def test_processes_counts_this_process_and_each_worker_task():
    from tfpipe.devices import processes

    assert processes(["/cpu:1", "/device:CPU:2", "/job:localhost/replica:0/task:0/device:CPU:0"]) == 1
    assert processes(["/cpu:0", "/job:worker/replica:0/task:0/device:CPU:0",
                      "/job:worker/task:1"]) == 3
    assert processes(["/job:worker/replica:0/task:1/device:GPU:0",
                      "/job:worker/task:1/device:GPU:1"]) == 1


def test_parse_addresses():
    assert cluster_module.parse_addresses(" h1:2222, h2:2223 ,") == ["h1:2222", "h2:2223"]
    assert cluster_module.parse_addresses(["[::1]:2222"]) == ["[::1]:2222"]
    for bad, words in (("", "names no worker"), ("h1", "not 'host:port'"),
                       ("h1:0", "not 'host:port'"), ("h1:x", "not 'host:port'"),
                       ("h1:1,h1:1", "repeats ['h1:1']")):
        with pytest.raises(tfpipe.PipelineError, match=words.replace("[", r"\[").replace("]", r"\]")):
            cluster_module.parse_addresses(bad)


def test_tf_config(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"],
                                                            "chief": ["c:3"]},
                                                "task": {"type": "worker", "index": 1}}))
    assert cluster_module.tf_config() == (["a:1", "b:2"], 1)
    assert cluster_module.parse_addresses(None) == ["a:1", "b:2"]
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]},
                                                "task": {"type": "chief", "index": 0}}))
    assert cluster_module.tf_config() == (["a:1"], None)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]},
                                                "task": {"type": "worker", "index": 3}}))
    with pytest.raises(tfpipe.PipelineError, match="task index 3 is not a worker"):
        cluster_module.tf_config()
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(tfpipe.PipelineError, match="has no cluster job 'worker'"):
        cluster_module.tf_config()
    monkeypatch.delenv("TF_CONFIG")
    with pytest.raises(tfpipe.PipelineError, match="TF_CONFIG is not set"):
        tfpipe.cluster()


@pytest.mark.parametrize("args, words", [
    (["--cluster", "localhost:1,localhost:2"], "--cluster needs --task I"),
    (["--cluster", "localhost:1", "--task", "1"], "--task 1 is not in the cluster localhost:1"),
    (["--cluster", "localhost", "--task", "0"], "is not 'host:port'"),
    ([], "TF_CONFIG is not set"),
    (["--cluster", "localhost:1", "--task", "0", "--cpus", "0,9999"],
     "--cpus 0,9999: this process may use cores "),
])
def test_worker_usage_errors(capsys, monkeypatch, args, words):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert cli.main(["worker", *args]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tfpipe worker: error: ") and words in err[0], err


def test_watchdog_refuses_a_worker_that_does_not_answer():
    address = f"localhost:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(tfpipe.WorkerUnavailableError) as info:
        with tfpipe.Watchdog([address], timeout_s=0.5, stages_by_address={address: [0, 1]}):
            raise AssertionError("the block must not run")
    assert time.monotonic() - started < 5
    err = info.value
    assert err.address == address and err.task == 0 and err.stages == (0, 1)
    assert f"Worker task 0 at {address}" in str(err) and "pipeline stages 0, 1" in str(err)
    assert "unreachable" in err.reason


def test_cluster_refuses_a_worker_that_does_not_answer():
    address = f"localhost:{free_port()}"
    with pytest.raises(tfpipe.WorkerUnavailableError, match=f"did not answer within 0.3 s.*"
                       f"tfpipe worker --cluster {address} --task 0"):
        tfpipe.cluster(address, timeout_s=0.3)


def test_cluster_threads_must_come_before_tensorflow_starts():
    import tensorflow as tf

    tf.constant(0)  # TensorFlow has initialised in this process, with its default pools
    with pytest.raises(tfpipe.DeviceConfigurationError, match=r"threads=3\) was called after "
                       "TensorFlow initialised"):
        tfpipe.cluster("localhost:1", threads=3)
    with pytest.raises(tfpipe.PipelineError, match="threads must be a positive integer"):
        tfpipe.cluster("localhost:1", threads=0)


def test_watchdog_arguments():
    with pytest.raises(tfpipe.PipelineError, match="call tfpipe.cluster first"):
        tfpipe.Watchdog()  # this process connected to no cluster
    with pytest.raises(tfpipe.PipelineError, match="timeout_s must be a positive number"):
        tfpipe.Watchdog("a:1", timeout_s=0)
    with pytest.raises(tfpipe.PipelineError, match=r"names \['b:2'\], which are not among"):
        tfpipe.Watchdog("a:1", stages_by_address={"b:2": [0]})


def test_remote_device_without_a_cluster_is_refused():
    assert tfpipe.worker_devices() == []
    assert tfpipe.default_devices() == [f"/device:CPU:{i}" for i in range(4)]
    with pytest.raises(tfpipe.PipelineError, match="not connected to a cluster.*tfpipe.cluster"):
        resolve_devices(["/job:worker/replica:0/task:0/device:CPU:0"], 1)


def test_close_connections_shuts_down_only_our_connections_to_that_address():
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_server(("127.0.0.1", 0)) as other:
        port, other_port = server.getsockname()[1], other.getsockname()[1]
        ours = socket.create_connection(("127.0.0.1", port), 2)
        keep = socket.create_connection(("127.0.0.1", other_port), 2)
        peer, _ = server.accept()
        peer2, _ = other.accept()
        try:
            assert watchdog_module.close_connections(f"localhost:{port}") >= 1
            ours.settimeout(2)
            assert ours.recv(1) == b""  # shut down: end of stream, not a wait
            keep.sendall(b"x")
            assert peer2.recv(1) == b"x"  # the other connection is untouched
            assert watchdog_module.close_connections(f"localhost:{free_port()}") == 0
        finally:
            for s in (ours, keep, peer, peer2):
                s.close()


def test_worker_unavailable_error_pickles():
    import pickle

    err = tfpipe.WorkerUnavailableError("m", address="a:1", task=1, stages=(1,), reason="r")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.address, back.task, back.stages, back.reason) == ("m", "a:1", 1, (1,), "r")
