"""Real `tfpipe worker` processes for the tests: started on free loopback ports, always ended.

Shared by tests/test_cluster.py and tests/test_cluster_recovery.py. A `WorkerPool` starts
`python -m tfpipe worker` processes, waits (bounded) until each prints its ready line, can
start a task again on its old port after it died, and ends every process it started
(SIGCONT, SIGTERM, then SIGKILL), also at interpreter exit.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 90.0
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
_everything_started: list[subprocess.Popen[str]] = []


def gone(pid: int) -> bool:
    """Whether no process has this pid any more."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def free_port() -> int:
    """A TCP port that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def end(proc: subprocess.Popen[str]) -> None:
    """Ends a process we started, whatever its state: resume, SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            return
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@atexit.register
def _end_everything() -> None:
    for proc in _everything_started:
        end(proc)


class Worker:
    """One `python -m tfpipe worker` process and the lines it printed."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        self.lines: queue.Queue[str] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tfpipe", "worker", *args], stdout=subprocess.PIPE,
            stderr=log.open("w"), text=True, env=env, cwd=log.parent,
        )
        _everything_started.append(self.proc)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def next_line(self, timeout: float) -> str:
        """The next line the worker printed, waiting at most `timeout` seconds."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"worker printed nothing within {timeout} s (exit status {self.proc.poll()}); "
                f"stderr: {self.log.read_text()[-3000:]}"
            ) from None


class WorkerPool:
    """Starts workers in `directory` (their logs go there) and ends them all in `stop_all`."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.started: list[Worker] = []

    def start(self, n: int, tf_config_task: int | None = None) -> tuple[list[str], list[Worker]]:
        """Starts n workers on free ports and waits until each prints its ready line.

        The worker `tf_config_task` (if any) reads its cluster and task from `TF_CONFIG`;
        the others get `--cluster` and `--task`.
        """
        addresses = [f"localhost:{free_port()}" for _ in range(n)]
        batch = [self._launch(addresses, task, task == tf_config_task) for task in range(n)]
        deadline = time.monotonic() + READY_TIMEOUT_S
        for task, worker in enumerate(batch):
            self._wait_ready(worker, addresses, task, deadline)
        return addresses, batch

    def restart(self, addresses: list[str], task: int) -> Worker:
        """Starts task `task` of the cluster `addresses` again, on its old port (the old
        process must be gone), and waits until it is ready."""
        worker = self._launch(addresses, task, False)
        self._wait_ready(worker, addresses, task, time.monotonic() + READY_TIMEOUT_S)
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            end(worker.proc)

    def _launch(self, addresses: list[str], task: int, tf_config: bool) -> Worker:
        env = dict(ENV)
        if tf_config:
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses},
                                           "task": {"type": "worker", "index": task}})
            args: list[str] = []
        else:
            args = ["--cluster", ",".join(addresses), "--task", str(task)]
        runs = sum(1 for w in self.started if w.log.name.startswith(f"worker{task}"))
        log = self.dir / (f"worker{task}.log" if runs == 0 else f"worker{task}-{runs}.log")
        worker = Worker(args + ["--threads", "1"], log, env)
        self.started.append(worker)
        return worker

    @staticmethod
    def _wait_ready(worker: Worker, addresses: list[str], task: int, deadline: float) -> None:
        line = worker.next_line(max(deadline - time.monotonic(), 1.0))
        assert line == f"tfpipe worker {task} ready at {addresses[task]}", line
