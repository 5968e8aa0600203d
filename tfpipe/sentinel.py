"""The out-of-memory sentinel: a small process beside `tfpipe worker` that reports its OOM kill.

Design:
- Why a second process: the kernel kills a worker that runs out of memory with SIGKILL, so
  the worker cannot say why it died, and the client (maybe on another host) cannot read the
  worker's cgroup. So `tfpipe worker` starts this sentinel as its child before it starts
  serving. The worker's pid stays the TensorFlow server's own (tests stop, kill and restart
  worker pids), and the sentinel, a child, is in the worker's cgroup, so whoever cleans up
  the cgroup ends it too.
- Light: it imports only the standard library, gRPC (a TensorFlow requirement) and plain
  modules (`tfpipe.memory_cgroup`, `tfpipe.oom_report`, `tfpipe.report`); `command` loads
  them without running the package's `__init__` (which imports TensorFlow). About 30 MB
  resident.
- Watching: `start` returns once the sentinel took its first reading (it says so on its
  stdout), so a worker killed early is not missed. It waits for the worker to exit (a pidfd,
  else its parent pid changing), and
  every second reads the worker's memory cgroup, the machine's `oom_kill` count and the
  worker's resident peak. Once the worker is gone it compares the counters with those of
  `WINDOW_S` earlier: a rise of the cgroup's `oom_kill` (or, without one, of the machine's)
  means the kernel killed it for memory. The kernel counts the kill before the process
  finishes exiting, hence a window rather than the last reading.
- Reporting: it then binds the worker's port (exclusively: a live worker there makes the
  bind fail and the sentinel leave) and answers every gRPC call, TensorFlow's
  `WorkerService/GetStatus` included, with RESOURCE_EXHAUSTED and the report
  (`tfpipe.oom_report`): `tfpipe.cluster.probe`, `tfpipe.Watchdog` and the error
  translation of a failed step (`tfpipe.oom`) read it. It serves until SIGTERM or SIGINT,
  `ttl_s`, or a new `tfpipe worker` on the port calls `LEAVE_METHOD` (`dismiss`), so that a
  restart on the same port works. A worker that died for another reason leaves the sentinel
  nothing to say: it exits at once, printing nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import grpc

from tfpipe import memory_cgroup
from tfpipe.oom_report import OomReport

LEAVE_METHOD = "/tfpipe.Sentinel/Leave"
"""The call that makes a sentinel stop serving and free the port (`dismiss`)."""

DEFAULT_TTL_S = 600.0
"""Seconds a sentinel reports an out-of-memory kill by default (`--oom-report-s`)."""

POLL_S = 1.0
"""Seconds between readings while the worker runs."""

WINDOW_S = 5.0
"""A kill counted this many seconds before the worker was gone still counts as its own."""

READY_TIMEOUT_S = 30.0
"""How long `start` waits, at most, for the sentinel to take its first reading."""

_BOOTSTRAP = (
    "import sys, types\n"
    "package = types.ModuleType('tfpipe')\n"
    "package.__path__ = [{folder!r}]\n"
    "sys.modules['tfpipe'] = package\n"
    "from tfpipe.sentinel import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


# the worker's side --------------------------------------------------------------------------


def supported() -> bool:
    """Whether this machine can tell an out-of-memory kill (Linux: `/proc/vmstat` or a cgroup)."""
    return memory_cgroup.system_oom_kills() is not None or memory_cgroup.cgroup_dir() is not None


def command(pid: int, port: int, address: str, task: int | None, ttl_s: float) -> list[str]:
    """The command line of a sentinel for worker process `pid` listening on `port`.

    The sentinel runs with this interpreter and loads its modules from this package's folder
    without the package's `__init__`, so it imports no TensorFlow.

    Args:
        pid: the worker's process id; the sentinel must be its child.
        port: the worker's port.
        address: the worker's `host:port`, for the report.
        task: the worker's task index, for the report.
        ttl_s: how long to report an out-of-memory kill, in seconds.
    """
    code = _BOOTSTRAP.format(folder=str(Path(__file__).resolve().parent))
    args = ["--pid", str(pid), "--port", str(port), "--address", address, "--ttl", str(ttl_s)]
    if task is not None:
        args += ["--task", str(task)]
    return [sys.executable, "-c", code, *args]


def start(port: int, address: str, task: int | None, ttl_s: float,
          ready_timeout_s: float = READY_TIMEOUT_S) -> subprocess.Popen[bytes]:
    """Starts the sentinel of this process and waits (bounded) until it watches.

    Call it before serving: a worker killed before its sentinel took its first reading would
    go unreported. Its stderr is this process's when that is a file or a terminal (its
    report then lands in the worker's log); else nothing, so that a pipe a caller reads to
    its end is not held open by the sentinel after the worker exits.

    Args:
        port, address, task, ttl_s: as for `command`.
        ready_timeout_s: the longest wait for the sentinel to say it watches.

    Returns:
        The sentinel's process; end it with `terminate()` when the worker stops normally.
    """
    try:
        mode = os.fstat(2).st_mode
        keep = stat.S_ISREG(mode) or stat.S_ISCHR(mode)
    except OSError:
        keep = False
    proc = subprocess.Popen(
        command(os.getpid(), port, address, task, ttl_s), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=None if keep else subprocess.DEVNULL, close_fds=True,
    )
    assert proc.stdout is not None
    with proc.stdout:  # one line, "watching", then the sentinel closes its end
        if select.select([proc.stdout], [], [], ready_timeout_s)[0]:
            proc.stdout.readline()
    return proc


def port_free(port: int) -> bool:
    """Whether a server could bind `port` on every interface now (as TensorFlow's does)."""
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.bind((host, port))
                return True
        except OSError as err:
            if family == socket.AF_INET6 and err.errno != errno.EADDRINUSE:
                continue  # no IPv6 here: try IPv4
            return False
    return False


def dismiss(port: int, timeout_s: float = 5.0) -> bool:
    """Asks a sentinel serving on `port` to leave, and waits (bounded) until the port is free.

    Args:
        port: the port a new worker is about to listen on.
        timeout_s: the longest wait for the port once the sentinel agreed to leave.

    Returns:
        Whether a sentinel was there and left; False also when the port is free already or
        held by something else (whose own error the worker's start then reports).
    """
    if port_free(port):
        return False
    channel = grpc.insecure_channel(f"localhost:{port}")
    try:
        channel.unary_unary(LEAVE_METHOD)(b"", timeout=1.0)
    except grpc.RpcError:
        return False
    finally:
        channel.close()
    deadline = time.monotonic() + timeout_s
    while not port_free(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


# the sentinel -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reading:
    at: float
    cgroup: memory_cgroup.MemoryReading | None
    system: int | None
    resident: int | None


def main(argv: list[str]) -> int:
    """Runs a sentinel (see the module's design); returns its exit status.

    Args:
        argv: `--pid P --port N --address HOST:PORT --ttl S [--task I]`.
    """
    parser = argparse.ArgumentParser(prog="tfpipe-sentinel")
    for name, kind in (("--pid", int), ("--port", int), ("--address", str), ("--ttl", float)):
        parser.add_argument(name, type=kind, required=True)
    parser.add_argument("--task", type=int, default=None)
    args = parser.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_quietly)
    try:
        report = watch(args.pid, args.address, args.task, _say_watching)
        if report is not None:
            serve(report, args.port, args.ttl)
    except SystemExit:
        pass
    return 0


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _say_watching() -> None:
    """Tells `start` (on stdout) that the first reading is taken, then lets go of stdout."""
    try:
        sys.stdout.write("watching\n")
        sys.stdout.flush()
    except OSError:
        pass  # the worker stopped listening: nothing to tell
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def watch(pid: int, address: str, task: int | None,
          watching: Callable[[], None] = lambda: None) -> OomReport | None:
    """Waits until worker `pid` (this process's parent) exits; its OOM report, or None when
    it was not killed for memory (or had exited already). `watching` is called once the
    first reading is taken."""
    if os.getppid() != pid:
        return None
    found = memory_cgroup.cgroup_dir(pid)
    readings = [_read(pid, found)]  # readings[0]: the newest one at least WINDOW_S old
    with _exit_waiter(pid) as exited:
        watching()
        while not exited(POLL_S):
            readings.append(_read(pid, found))
            while len(readings) > 1 and readings[1].at <= time.monotonic() - WINDOW_S:
                readings.pop(0)
    final = _read(pid, found)
    return _report(readings[0], final, readings[-1].resident, pid, address, task)


def _read(pid: int, found: tuple[Path, int] | None) -> _Reading:
    return _Reading(time.monotonic(), None if found is None else memory_cgroup.read(*found),
                    memory_cgroup.system_oom_kills(), memory_cgroup.resident_peak(pid))


def _report(before: _Reading, after: _Reading, resident: int | None, pid: int, address: str,
            task: int | None) -> OomReport | None:
    """The report when the counters rose between the two readings, else None."""
    group, was = after.cgroup, before.cgroup
    kills = None if group is None else group.oom_kills
    kills_before = None if was is None else was.oom_kills
    if kills is not None and kills_before is not None:
        if kills <= kills_before:
            return None
        scope = "cgroup"
    elif after.system is not None and before.system is not None and after.system > before.system:
        scope = "system"
    else:
        return None
    return OomReport(
        task=task, address=address, pid=pid, scope=scope,
        limit=group.limit if group else None, peak=group.peak if group else None,
        failcnt=group.failcnt if group else None, oom_kills=group.oom_kills if group else None,
        resident_peak=resident, cgroup=group.path if group else None,
    )


@contextlib.contextmanager
def _exit_waiter(pid: int) -> Iterator[Callable[[float], bool]]:
    """`exited(timeout_s)`: waits up to `timeout_s` for process `pid` to exit; whether it did.

    A pidfd (Linux 5.3+) wakes the moment the process exits (before it is reaped); else the
    parent pid is polled, which changes when the parent exits (this process is its child).
    """
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = -1

    def exited(timeout_s: float) -> bool:
        if fd >= 0:
            return bool(select.select([fd], [], [], timeout_s)[0])
        deadline = time.monotonic() + timeout_s
        while os.getppid() == pid:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    try:
        yield exited
    finally:
        if fd >= 0:
            os.close(fd)


def serve(report: OomReport, port: int, ttl_s: float) -> None:
    """Answers every call on `port` with RESOURCE_EXHAUSTED and the report, until `ttl_s`,
    a `LEAVE_METHOD` call or a signal; returns at once when the port cannot be bound."""
    leave = threading.Event()
    text = report.text()
    server = grpc.server(ThreadPoolExecutor(max_workers=2), handlers=[_Handler(text, leave)],
                         options=[("grpc.so_reuseport", 0)])
    if not any(_bind(server, host, port) for host in ("[::]", "0.0.0.0")):
        return
    server.start()
    sys.stderr.write(f"{text.splitlines()[0]}\ntfpipe sentinel: reporting it on port {port} for "
                     f"up to {ttl_s:.0f} s, or until a worker starts there again.\n")
    sys.stderr.flush()
    try:
        leave.wait(ttl_s)
    finally:
        server.stop(0.5).wait(2.0)


def _bind(server: Any, host: str, port: int) -> bool:
    try:
        return bool(server.add_insecure_port(f"{host}:{port}"))
    except RuntimeError:  # gRPC raises where older releases returned 0
        return False


class _Handler(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Every method: RESOURCE_EXHAUSTED with the report; `LEAVE_METHOD`: leave."""

    def __init__(self, text: str, leave: threading.Event) -> None:
        self.text, self.leave = text, leave

    def service(self, details: Any) -> Any:
        if details.method == LEAVE_METHOD:
            return grpc.unary_unary_rpc_method_handler(self._leave)
        return grpc.unary_unary_rpc_method_handler(self._report)

    def _report(self, request: bytes, context: Any) -> bytes:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.text)
        return b""  # not reached: abort raises

    def _leave(self, request: bytes, context: Any) -> bytes:
        self.leave.set()
        return b""
