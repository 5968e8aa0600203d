"""`Watchdog`: a dead or stopped TensorFlow worker ends the training step with a clear error.

Design:
- Health: a worker is alive and responsive when it answers TensorFlow's own
  `WorkerService/GetStatus` gRPC call within a deadline. A plain TCP connect proves nothing
  for a stopped (SIGSTOP) process: the kernel still accepts connections on its listening
  socket. `Watchdog` calls GetStatus on every worker from background threads.
- Interrupting a blocked step: a training step waiting on a stopped worker blocks inside
  TensorFlow's C++ runtime, where no Python exception reaches it, and cancelling the
  function's `CancellationManager` did not end it either. What does is closing this
  process's own TCP connections to that worker (`shutdown(2)` on a duplicate of the socket's
  descriptor, found through `/proc/self/fd` and `/proc/net/tcp`): gRPC fails the pending
  calls with UNAVAILABLE and the step raises. The watchdog keeps closing new connections to
  the failed worker (TensorFlow reconnects for its clean-up calls) until the `with` block
  ends, then turns the TensorFlow error into a `WorkerUnavailableError`. Where that cannot
  work (no `/proc`, Linux only), the watchdog ends the process with exit status
  `EXIT_WORKER_UNAVAILABLE` after `exit_after_s` rather than leave it hanging.
- Out of memory: a worker the kernel killed for memory is reported by its sentinel on its
  port (`tfpipe.sentinel`); a status call then fails with the report, and the error becomes
  `WorkerOutOfMemoryError` (`tfpipe.oom`), as it does without a watchdog. The sentinel binds
  a moment after the worker died, so an unreachable worker is asked again, for at most
  `tfpipe.oom.REPORT_WAIT_S`, before the error is raised.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import tensorflow as tf

from tfpipe import oom
from tfpipe.cluster import (
    EXIT_WORKER_UNAVAILABLE,
    JOB,
    connected_addresses,
    parse_addresses,
    probe,
)
from tfpipe.errors import PipelineError, WorkerOutOfMemoryError, WorkerUnavailableError
from tfpipe.oom_report import parse

_TASK_IN_MESSAGE = re.compile(r"/job:" + JOB + r"/replica:\d+/task:(\d+)")
log = logging.getLogger("tfpipe.cluster")


# the watchdog -----------------------------------------------------------------------------


class Watchdog:
    """Checks, in background threads, that every worker answers; a failed one ends the step.

    While the `with` block runs, each worker is asked for its status (a TensorFlow gRPC call
    with a deadline) every `interval_s`. A worker that has not answered for `timeout_s`
    (killed, stopped, hung, unreachable) is declared failed: the watchdog logs it, closes
    this process's connections to that worker so that a training step blocked on it raises
    instead of waiting forever, and the block ends with a `WorkerUnavailableError` naming the
    worker's address, task and stages. A worker that dies outright usually fails the step
    at once with TensorFlow's `UnavailableError`; the watchdog replaces that error too.

    Keep everything that touches the workers inside the block: after it, nothing guards a
    call to a stopped worker.

    Args:
        addresses: the workers' `host:port`, task 0 first (as given to `tfpipe.cluster`);
            None uses the cluster the latest `tfpipe.cluster(...)` connected to.
        timeout_s: seconds without an answer after which a worker counts as failed.
        stages_by_address: the pipeline stages each worker holds, for the error message;
            `Watchdog.for_pipeline` fills it from a `Pipeline`.
        interval_s: seconds between status calls to a worker; default
            `min(1, timeout_s / 5)`.
        exit_after_s: if the block has not ended this many seconds after a failure was
            detected (the blocked call could not be interrupted, for example without Linux's
            `/proc`), print the error and end the process with exit status
            `EXIT_WORKER_UNAVAILABLE` (75); None waits forever instead.

    Raises:
        WorkerUnavailableError: on entering, when a worker does not answer within
            `timeout_s`; on leaving, when a worker failed during the block.
        WorkerOutOfMemoryError: in place of the above, when the worker's out-of-memory
            sentinel reports that the kernel killed it for memory (see `tfpipe.sentinel`).
        PipelineError: for bad arguments, or no addresses and no connected cluster.

    Example:
        >>> devices = tfpipe.cluster("h1:2222,h2:2222")
        >>> with tfpipe.Watchdog(timeout_s=30):
        ...     tfpipe.fit(model, x, y, devices=devices, micro_batches=8)
        ...     model.save("trained.keras")
    """

    def __init__(
        self,
        addresses: str | Sequence[str] | None = None,
        timeout_s: float = 30.0,
        stages_by_address: Mapping[str, Sequence[int]] | None = None,
        *,
        interval_s: float | None = None,
        exit_after_s: float | None = 60.0,
    ) -> None:
        if addresses is None:
            if not connected_addresses():
                raise PipelineError(
                    "Watchdog() without addresses watches the cluster of the latest "
                    "tfpipe.cluster(...) call, but none was made: call tfpipe.cluster first, or "
                    "pass addresses='host:port,host:port'."
                )
            addresses = connected_addresses()
        self.addresses = parse_addresses(addresses)
        for name, value in (("timeout_s", timeout_s), ("interval_s", interval_s),
                            ("exit_after_s", exit_after_s)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value <= 0):
                raise PipelineError(f"{name} must be a positive number of seconds, got {value!r}.")
        self.timeout_s = float(timeout_s)
        self.interval_s = float(interval_s) if interval_s else min(1.0, self.timeout_s / 5)
        self.exit_after_s = exit_after_s
        self.stages_by_address = {a: tuple(s) for a, s in (stages_by_address or {}).items()}
        unknown = sorted(set(self.stages_by_address) - set(self.addresses))
        if unknown:
            raise PipelineError(
                f"stages_by_address names {unknown}, which are not among the watched workers "
                f"{self.addresses}."
            )
        self.error: WorkerUnavailableError | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._exited = threading.Event()
        self._threads: list[threading.Thread] = []

    @classmethod
    def for_pipeline(cls, pipeline: Any, timeout_s: float = 30.0, **kwargs: Any) -> Watchdog:
        """A watchdog over the connected cluster that names each worker's stages of `pipeline`.

        Args:
            pipeline: a `tfpipe.Pipeline` whose devices come from `tfpipe.cluster(...)`.
            timeout_s: as for `Watchdog`.
            **kwargs: `interval_s`, `exit_after_s` as for `Watchdog`.

        Returns:
            The `Watchdog`.

        Raises:
            PipelineError: when no cluster is connected.
        """
        addresses = connected_addresses()
        if not addresses:
            raise PipelineError("Watchdog.for_pipeline needs tfpipe.cluster(...) to be called "
                                "first: the pipeline's devices must be the cluster's.")
        return cls(addresses, timeout_s, oom.stages_by_address(pipeline.stages, addresses),
                   **kwargs)

    # context manager ------------------------------------------------------------------------

    def __enter__(self) -> Watchdog:
        self.error = None
        self._stop.clear()
        self._exited.clear()
        self._threads = []
        for address in self.addresses:
            reason = probe(address, self.timeout_s)
            if reason is not None:
                raise self._error(address, reason)
        for address in self.addresses:
            thread = threading.Thread(target=self._watch, args=(address,), daemon=True,
                                      name=f"tfpipe-watchdog-{address}")
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> Literal[False]:
        self._exited.set()
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=0.1)  # one still waiting on a deadline ends by itself
        error = self.error
        if error is not None:
            error = self._upgrade(error)
        elif isinstance(exc, tf.errors.OpError):
            error = self._diagnose(exc)
        if error is None:
            return False
        if exc is None or isinstance(exc, tf.errors.OpError):
            raise error from exc
        return False  # another exception (KeyboardInterrupt, a bug): let it through

    # internals -----------------------------------------------------------------------------

    def _watch(self, address: str) -> None:
        """One worker's loop: a status call every interval; failed after timeout_s of silence."""
        import grpc

        channel = grpc.insecure_channel(address)
        last_ok = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    reason = probe(address,
                                   max(last_ok + self.timeout_s - time.monotonic(), 0.05), channel)
                except Exception as err:  # noqa: BLE001 (a failed probe, not a crashed watchdog)
                    reason = f"status call raised {type(err).__name__}: {err}"
                now = time.monotonic()
                if reason is None:
                    last_ok = now
                elif now - last_ok >= self.timeout_s and not self._stop.is_set():
                    self._fail(address, f"{reason}; silent for {now - last_ok:.1f} s")
                    return
                self._stop.wait(self.interval_s)
        finally:
            channel.close()

    def _fail(self, address: str, reason: str) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.error = self._error(address, reason)
        log.error("%s Interrupting the calls waiting on it.", self.error)
        threading.Thread(target=self._interrupt, args=(address,), daemon=True,
                         name=f"tfpipe-watchdog-interrupt-{address}").start()

    def _interrupt(self, address: str) -> None:
        """Closes our connections to the failed worker until the block ends (or gives up)."""
        started = time.monotonic()
        while not self._exited.is_set():
            close_connections(address)
            if (self.exit_after_s is not None
                    and time.monotonic() - started > self.exit_after_s):
                self._exit_process()
            self._exited.wait(0.05)

    def _exit_process(self) -> None:
        message = (f"tfpipe: {self.error}\ntfpipe: the call waiting on the worker could not be "
                   f"interrupted within {self.exit_after_s} s; ending the process with exit "
                   f"status {EXIT_WORKER_UNAVAILABLE}.\n")
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        try:
            os.write(2, message.encode())
        finally:
            os._exit(EXIT_WORKER_UNAVAILABLE)

    def _diagnose(self, exc: tf.errors.OpError) -> WorkerUnavailableError | None:
        """Which worker a TensorFlow error came from: one not answering now, or the task an
        UnavailableError names; None for an error with every worker healthy."""
        first = str(exc.message if hasattr(exc, "message") else exc).strip().splitlines()
        summary = f"{type(exc).__name__}: {first[0] if first else ''}"
        report = parse(str(exc))  # the step met a sentinel itself
        if report is not None and report.address in self.addresses:
            return self._error(report.address, report.text())
        results = oom.probe_all(self.addresses, min(self.timeout_s, 2.0))
        for address in self.addresses:
            if results[address]:
                return self._upgrade(
                    self._error(address, f"{results[address]}; the step failed with {summary}"))
        if isinstance(exc, tf.errors.ResourceExhaustedError):
            held = oom.worker_stages(self.stages_by_address, self.addresses)
            return oom.device_error(str(exc), held or None, self.addresses)
        if isinstance(exc, tf.errors.UnavailableError):
            match = _TASK_IN_MESSAGE.search(str(exc))
            if match and int(match.group(1)) < len(self.addresses):
                address = self.addresses[int(match.group(1))]
                return self._error(address, f"the connection to it failed ({summary}); it "
                                            "answers status calls now, so the failure may "
                                            "have been transient")
        return None

    def _upgrade(self, error: WorkerUnavailableError) -> WorkerUnavailableError:
        """`error`, or the out-of-memory error when the unreachable worker's sentinel reports
        within `tfpipe.oom.REPORT_WAIT_S` (it binds a moment after the worker died)."""
        if isinstance(error, WorkerOutOfMemoryError) or not error.reason.startswith("unreach"):
            return error
        report = oom.await_report(error.address)
        return error if report is None else self._error(error.address, report.text())

    def _error(self, address: str, reason: str) -> WorkerUnavailableError:
        report = parse(reason)
        if report is not None:  # its sentinel says the kernel killed it for memory
            by_address = {a: list(s) for a, s in self.stages_by_address.items()}
            return oom.worker_error(report, self.addresses, by_address or None,
                                    reason.partition("; the step failed with ")[2])
        task = self.addresses.index(address)
        stages = self.stages_by_address.get(address)
        held = (f"pipeline stage{'s' if len(stages) != 1 else ''} "
                f"{', '.join(map(str, stages))}" if stages else "stages not given to the watchdog")
        return WorkerUnavailableError(
            f"Worker task {task} at {address} (/job:{JOB}/replica:0/task:{task}; {held}) is "
            f"unavailable: {reason}. Its variables are lost if it was restarted: restart it "
            f"with `tfpipe worker --cluster {','.join(self.addresses)} --task {task}`, "
            "reconnect with tfpipe.cluster(...) in a new process and resume from your last "
            "checkpoint.",
            address=address, task=task, stages=stages, reason=reason,
        )


# interrupting -----------------------------------------------------------------------------


def close_connections(address: str) -> int:
    """Shuts down this process's TCP connections to `address` (Linux: needs `/proc`).

    gRPC then fails every call pending on them with UNAVAILABLE, which ends a TensorFlow
    step blocked on a stopped worker. Only this process's own sockets are touched, through
    duplicates of their descriptors, so the descriptors stay valid for their owners.

    Args:
        address: the worker's `host:port`.

    Returns:
        The number of connections shut down (0 where `/proc` is not available).
    """
    host, _, port_text = address.rpartition(":")
    port = int(port_text)
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
        targets = {_plain_ip(str(info[4][0])) for info in infos}
    except OSError:
        return 0
    inodes = {inode for ip, rport, inode in _tcp_peers() if rport == port and ip in targets}
    if not inodes:
        return 0
    closed = 0
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if not (target.startswith("socket:[") and int(target[8:-1]) in inodes):
            continue
        try:
            dup = os.dup(int(fd))
        except OSError:
            continue
        try:
            if os.fstat(dup).st_ino in inodes:  # not a descriptor reused meanwhile
                sock = socket.socket(fileno=dup)
                dup = -1
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    closed += 1
                except OSError:
                    pass
                finally:
                    sock.close()
        finally:
            if dup >= 0:
                os.close(dup)
    return closed


def _tcp_peers() -> list[tuple[str, int, int]]:
    """(remote ip, remote port, socket inode) of every TCP socket in /proc/net/tcp{,6}."""
    peers = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            ip_hex, _, port_hex = fields[2].partition(":")
            words = [int(ip_hex[i:i + 8], 16) for i in range(0, len(ip_hex), 8)]
            raw = b"".join(struct.pack("=I", w) for w in words)
            peers.append((_plain_ip(str(ipaddress.ip_address(raw))), int(port_hex, 16),
                          int(fields[9])))
    return peers


def _plain_ip(ip: str) -> str:
    """An IP address as text, IPv4-mapped IPv6 (`::ffff:127.0.0.1`) as plain IPv4."""
    parsed = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    return str(parsed)
