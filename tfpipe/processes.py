"""Child processes for tests and benchmarks: `tfpipe worker`s on free loopback ports, always ended.

Design: the tests and the benchmarks start real `python -m tfpipe worker` processes (and
client processes of their own) and must never leave one behind or wait on one forever. So
every process is started through a `ProcessGroup`, which sends its stderr to a log file and
remembers it; `end` ends a process whatever its state (it may be stopped: SIGCONT, then
SIGTERM, then SIGKILL after a bounded wait), every started process is also ended at
interpreter exit, and `raise_on_signals` turns SIGTERM into `KeyboardInterrupt` so that the
caller's `finally` (and atexit) run. Output is read line by line in a thread (`Lines`), so
every wait for a line has a deadline. Ports come from the kernel (`free_port`): a port that
was free a moment ago, bound by the worker moments later. A `WorkerPool` subclass can run each
worker under a launcher command (`WorkerPool.launcher`; `benchmarks/cgroups.py` puts each
worker into its own memory cgroup so), or pin each to a core of its own (`pin=True`:
`tfpipe worker --cpus`). This module imports no TensorFlow (`import tfpipe.processes` still
runs the package's `__init__`, which does).
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
"""The folder that holds the `tfpipe` package (a worker started here imports the same one)."""

READY_TIMEOUT_S = 120.0
"""How long `WorkerPool.start` waits, at most, for its workers to print their ready lines."""

END_TIMEOUT_S = 10.0
"""How long `end` waits after SIGTERM before SIGKILL, and after SIGKILL."""

_everything_started: list[subprocess.Popen[Any]] = []


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with `ROOT` first on `PYTHONPATH` and TensorFlow's C++ log
    quiet, plus `extra`: the environment of a started worker or client.

    Args:
        extra: variables to set or override.

    Returns:
        A new dict.
    """
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "2", **(extra or {})}


def nth_core(i: int) -> int:
    """The i-th core this process may use, modulo their number (`WorkerPool(pin=True)`'s core
    for task i)."""
    cores = sorted(os.sched_getaffinity(0))
    return cores[i % len(cores)]


def free_port() -> int:
    """A TCP port that nothing listened on a moment ago (on loopback).

    Returns:
        The port number.
    """
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def gone(pid: int) -> bool:
    """Whether no process has this pid any more.

    Args:
        pid: a process id.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def end(proc: subprocess.Popen[Any], timeout_s: float = END_TIMEOUT_S) -> None:
    """Ends a process we started, whatever its state: SIGCONT, SIGTERM, then SIGKILL.

    Args:
        proc: the process; nothing happens if it already ended.
        timeout_s: how long to wait after SIGTERM before SIGKILL, and after SIGKILL.
    """
    if proc.poll() is not None:
        return
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            return
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


def end_all(procs: list[subprocess.Popen[Any]]) -> None:
    """Ends every process in `procs`, the last started first (see `end`).

    Args:
        procs: processes in the order they were started.
    """
    for proc in reversed(procs):
        end(proc)


@atexit.register
def _end_everything() -> None:
    end_all(_everything_started)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def raise_on_signals(
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Makes each of `signals` raise `KeyboardInterrupt` in the main thread, as Ctrl-C does
    by default, so that `finally` blocks and atexit end the processes this one started (also
    where a shell started it with SIGINT ignored).

    Args:
        signals: the signals to handle so.
    """
    for sig in signals:
        signal.signal(sig, _raise_interrupt)


class Lines:
    """A started process's stdout, read line by line in a thread, with bounded waits.

    Args:
        proc: a process started with `stdout=subprocess.PIPE` in text mode.
        log: the file its stderr goes to (quoted when a wait fails).
    """

    def __init__(self, proc: subprocess.Popen[str], log: Path) -> None:
        self.proc, self.log = proc, log
        self.queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.queue.put(line.rstrip("\n"))
        self.queue.put(None)

    def next(self, timeout_s: float, what: str = "process") -> str:
        """The next line the process printed, waiting at most `timeout_s` seconds.

        Args:
            timeout_s: the longest wait, in seconds.
            what: names the process in the error.

        Returns:
            The line, without its newline.

        Raises:
            RuntimeError: nothing came within `timeout_s`, or the process ended; with the
                exit status and the tail of its log.
        """
        try:
            line = self.queue.get(timeout=timeout_s)
        except queue.Empty:
            line, reason = None, f"nothing within {timeout_s:.0f} s"
        else:
            reason = "the process ended"
        if line is None:
            tail = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{what}: {reason} (exit status {self.proc.poll()}); log {self.log}:\n{tail}"
            )
        return line


class Worker(Lines):
    """One `python -m tfpipe worker` process of a `WorkerPool` and the lines it printed.

    Args:
        proc: the process.
        log: its stderr's file.
        task: its task index in the cluster.
    """

    def __init__(self, proc: subprocess.Popen[str], log: Path, task: int) -> None:
        super().__init__(proc, log)
        self.task = task

    def next_line(self, timeout_s: float) -> str:
        """The next line the worker printed, waiting at most `timeout_s` seconds (see
        `Lines.next`)."""
        return self.next(timeout_s, f"worker {self.task}")


class ProcessGroup:
    """Processes started with their stderr in log files in `directory`, ended together.

    Every process is also ended at interpreter exit. Usable as a context manager, which
    calls `stop_all` on the way out.

    Args:
        directory: where the logs go; also the processes' default working directory.
        env: their default environment (default `worker_env()`).
    """

    def __init__(self, directory: Path, env: Mapping[str, str] | None = None) -> None:
        self.dir = directory
        self.env = dict(env) if env is not None else worker_env()
        self.processes: list[subprocess.Popen[str]] = []

    def spawn(self, cmd: list[str], log: str, *, env: Mapping[str, str] | None = None,
              cwd: Path | None = None, stdin: bool = False) -> subprocess.Popen[str]:
        """Starts `cmd` with stdout piped (text) and stderr written to `directory/log`.

        Args:
            cmd: the command line.
            log: the log file's name in `directory`.
            env: its environment (default the group's).
            cwd: its working directory (default `directory`).
            stdin: whether to pipe its stdin (else it reads nothing).

        Returns:
            The started process.
        """
        with (self.dir / log).open("w") as err:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=err, text=True,
                env=dict(env) if env is not None else self.env, cwd=cwd or self.dir,
            )
        self.processes.append(proc)
        _everything_started.append(proc)
        return proc

    @property
    def pids(self) -> list[int]:
        """The started processes' ids, in the order they were started."""
        return [p.pid for p in self.processes]

    def stop_all(self) -> None:
        """Ends every started process, the last started first (see `end`)."""
        end_all(self.processes)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


class WorkerPool(ProcessGroup):
    """Starts `python -m tfpipe worker` processes on free loopback ports (logs in `directory`).

    A worker is ready once it printed `tfpipe worker <task> ready at <address>`; every wait
    for that is bounded. A task whose process died can be started again on its old port.

    Args:
        directory: where the logs go (`worker<task>.log`, `worker<task>-<n>.log` for the
            n-th restart).
        env: the workers' environment (default `worker_env()`).
        threads: passed as `tfpipe worker --threads N`; 0 leaves the option out.
        pin: each worker on a core of its own (`tfpipe worker --cpus C`: task i on the i-th
            core this process may use, modulo their number), so a worker emulates one
            device of one core.
        ready_timeout_s: the longest wait for a batch of workers to be ready.
        args: more `tfpipe worker` options for every worker, such as
            `["--oom-report-s", "0"]`.
    """

    def __init__(self, directory: Path, env: Mapping[str, str] | None = None,
                 threads: int = 1, ready_timeout_s: float = READY_TIMEOUT_S,
                 args: Sequence[str] = (), pin: bool = False) -> None:
        super().__init__(directory, env)
        self.threads = threads
        self.pin = pin
        self.ready_timeout_s = ready_timeout_s
        self.args = list(args)
        self.workers: list[Worker] = []

    def start(self, n: int, tf_config_task: int | None = None) -> tuple[list[str], list[Worker]]:
        """Starts n workers on free ports and waits until each prints its ready line.

        Args:
            n: the cluster's size.
            tf_config_task: the worker (if any) that reads its cluster and task from
                `TF_CONFIG`; the others get `--cluster` and `--task`.

        Returns:
            The workers' addresses (`localhost:<port>`) and the workers, by task.

        Raises:
            RuntimeError: a worker was not ready in time or printed something else.
        """
        addresses = [f"localhost:{free_port()}" for _ in range(n)]
        batch = [self._launch(addresses, task, task == tf_config_task) for task in range(n)]
        deadline = time.monotonic() + self.ready_timeout_s
        for worker in batch:
            self._wait_ready(worker, addresses, deadline)
        return addresses, batch

    def restart(self, addresses: list[str], task: int) -> Worker:
        """Starts task `task` of the cluster `addresses` again, on its old port (the old
        process must be gone), and waits until it is ready.

        Returns:
            The new worker.
        """
        worker = self._launch(addresses, task, False)
        self._wait_ready(worker, addresses, time.monotonic() + self.ready_timeout_s)
        return worker

    def _launch(self, addresses: list[str], task: int, tf_config: bool) -> Worker:
        env = dict(self.env)
        if tf_config:
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses},
                                           "task": {"type": "worker", "index": task}})
            args: list[str] = []
        else:
            args = ["--cluster", ",".join(addresses), "--task", str(task)]
        if self.threads:
            args += ["--threads", str(self.threads)]
        if self.pin:
            args += ["--cpus", str(nth_core(task))]
        args += self.args
        runs = sum(1 for w in self.workers if w.task == task)
        log = f"worker{task}.log" if runs == 0 else f"worker{task}-{runs}.log"
        proc = self.spawn([*self.launcher(task), sys.executable, "-m", "tfpipe", "worker", *args],
                          log, env=env)
        worker = Worker(proc, self.dir / log, task)
        self.workers.append(worker)
        return worker

    def launcher(self, task: int) -> list[str]:
        """The command that a worker's command line is run under; none by default.

        A subclass may return, say, a shell that puts itself into a cgroup and then `exec`s
        the worker (`benchmarks/cgroups.py`): the worker's pid stays the pid of the started
        process, so ending, signalling and exit statuses work as without a launcher.

        Args:
            task: the worker's task.

        Returns:
            The command's words, put before the worker's own.
        """
        return []

    @staticmethod
    def _wait_ready(worker: Worker, addresses: list[str], deadline: float) -> None:
        line = worker.next_line(max(deadline - time.monotonic(), 1.0))
        expected = f"tfpipe worker {worker.task} ready at {addresses[worker.task]}"
        if line != expected:
            raise RuntimeError(f"worker {worker.task} printed {line!r}, not {expected!r}")
