"""Pipeline stages on TensorFlow's distributed runtime: worker processes, connecting, health.

Design:
- A worker is a plain `tf.distribute.Server` for one task of the job `"worker"` (`serve`,
  behind `tfpipe worker`). The client connects with
  `tf.config.experimental_connect_to_cluster` (`cluster`) and gets the workers' device names,
  which `Pipeline` / `tfpipe.fit` take as `devices=` like local ones: placement, forward,
  backward and optimizer updates then run on the workers.
- Thread limits of the pools that run the client's work on a worker are the *client's*
  settings (the client's config travels with its remote context); a worker's own
  `ConfigProto` does not hold them. `cluster(threads=N)` therefore sets the client's limits
  before connecting.
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
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import tensorflow as tf

from tfpipe.devices import worker_devices
from tfpipe.errors import DeviceConfigurationError, PipelineError, WorkerUnavailableError

JOB = "worker"
"""The job name of `tfpipe worker` processes: devices are `/job:worker/replica:0/task:i/...`."""

EXIT_WORKER_UNAVAILABLE = 75
"""Exit status of a process the watchdog ended because a blocked step could not be interrupted
(75 is `EX_TEMPFAIL`: a temporary failure, try again)."""

_STATUS_METHOD = "/tensorflow.WorkerService/GetStatus"
_TASK_IN_MESSAGE = re.compile(r"/job:" + JOB + r"/replica:\d+/task:(\d+)")
_connected: list[str] = []
log = logging.getLogger("tfpipe.cluster")


# addresses --------------------------------------------------------------------------------


def parse_addresses(spec: str | Sequence[str] | None) -> list[str]:
    """The worker addresses of a cluster spec, in task order.

    Args:
        spec: `"host:port,host:port"`, a list of `"host:port"`, or None to read the
            `"worker"` job of the `TF_CONFIG` environment variable.

    Returns:
        The addresses, task 0 first.

    Raises:
        PipelineError: for an empty spec, an address without a valid port, a repeated
            address, or a missing or malformed `TF_CONFIG`.

    Example:
        >>> parse_addresses("h1:2222, h2:2222")
        ['h1:2222', 'h2:2222']
    """
    if spec is None:
        return tf_config()[0]
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    addresses = [str(a).strip() for a in items if str(a).strip()]
    if not addresses:
        raise PipelineError(
            f"The cluster spec {spec!r} names no worker: give 'host:port,host:port' (task 0 "
            "first), or set TF_CONFIG."
        )
    for address in addresses:
        _check_address(address)
    repeated = sorted({a for a in addresses if addresses.count(a) > 1})
    if repeated:
        raise PipelineError(
            f"The cluster spec {spec!r} repeats {repeated}: each worker task needs its own "
            "host:port."
        )
    return addresses


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PipelineError(
            f"Worker address {address!r} is not 'host:port' with a port 1-65535; for example "
            "'localhost:2222' or '10.0.0.2:2222' ('[::1]:2222' for IPv6)."
        )


def tf_config() -> tuple[list[str], int | None]:
    """The `"worker"` job of the `TF_CONFIG` environment variable, and this process's task.

    `TF_CONFIG` is TensorFlow's JSON cluster description, for example
    `{"cluster": {"worker": ["h1:2222", "h2:2222"]}, "task": {"type": "worker", "index": 1}}`.

    Returns:
        The worker addresses (task 0 first) and this process's worker task index, or None
        when `TF_CONFIG` has no task or a task of another job (a client or chief).

    Raises:
        PipelineError: when `TF_CONFIG` is unset, not JSON, or has no `"worker"` job.
    """
    text = os.environ.get("TF_CONFIG", "")
    if not text.strip():
        raise PipelineError(
            "No cluster given and TF_CONFIG is not set: pass the workers as "
            "'host:port,host:port' (task 0 first), or set TF_CONFIG to "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}.'
        )
    try:
        config = json.loads(text)
        workers = config["cluster"][JOB]
    except (ValueError, KeyError, TypeError) as err:
        raise PipelineError(
            f"TF_CONFIG={text!r} has no cluster job {JOB!r} ({type(err).__name__}: {err}); it "
            'needs {"cluster": {"worker": ["host:port", ...]}, ...}.'
        ) from None
    addresses = parse_addresses(workers)
    task = config.get("task") or {}
    if task.get("type", JOB) != JOB or "index" not in task:
        return addresses, None
    index = task["index"]
    if not isinstance(index, int) or not 0 <= index < len(addresses):
        raise PipelineError(
            f"TF_CONFIG task index {index!r} is not a worker of the cluster {addresses}: use "
            f"0 to {len(addresses) - 1}."
        )
    return addresses, index


def connected_addresses() -> list[str]:
    """The worker addresses the latest `tfpipe.cluster(...)` call connected to (task order)."""
    return list(_connected)


# workers ----------------------------------------------------------------------------------


def serve(
    addresses: Sequence[str],
    task: int,
    *,
    threads: int | None = None,
    stop: threading.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Runs one worker task of a cluster until `stop` is set (the body of `tfpipe worker`).

    Args:
        addresses: every worker's `host:port`, task 0 first; the same list on every worker
            and on the client.
        task: this worker's index in `addresses`; it listens on that address's port, on all
            network interfaces.
        threads: intra- and inter-op thread pool sizes written into the server's
            `ConfigProto`. TensorFlow uses them for sessions created on the worker itself;
            the pools that run a tfpipe client's steps follow the client's settings, so
            limit those with `tfpipe.cluster(..., threads=N)` in the client.
        stop: the worker runs until this event is set; None runs until the process ends.
        on_ready: called once with a line such as `"tfpipe worker 0 ready at h1:2222"`
            when the server accepts connections.

    Raises:
        PipelineError: for a task index outside `addresses`, or bad addresses or threads.
        tf.errors.OpError: when the server cannot start, for example its port is in use.

    Example:
        >>> serve(["localhost:2222", "localhost:2223"], 0, on_ready=print)  # blocks
    """
    addresses = parse_addresses(addresses)
    if not isinstance(task, int) or isinstance(task, bool) or not 0 <= task < len(addresses):
        raise PipelineError(
            f"Worker task {task!r} is not in the cluster {addresses}: use 0 to "
            f"{len(addresses) - 1} (the position of this worker's own address)."
        )
    _check_threads(threads)
    config = None
    if threads is not None:
        config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=threads,
                                          inter_op_parallelism_threads=threads)
    server = tf.distribute.Server(tf.train.ClusterSpec({JOB: addresses}), job_name=JOB,
                                  task_index=task, config=config, start=True)
    if on_ready is not None:
        on_ready(f"tfpipe worker {task} ready at {addresses[task]}")
    stop = stop or threading.Event()
    while not stop.wait(0.5):  # a timed wait lets signal handlers run in the main thread
        pass
    del server  # TensorFlow's gRPC server has no clean stop: the process ends it


def _check_threads(threads: int | None) -> None:
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                or threads < 1):
        raise PipelineError(f"threads must be a positive integer or None, got {threads!r}.")


# health -----------------------------------------------------------------------------------


def probe(address: str, timeout_s: float, channel: Any = None) -> str | None:
    """Asks a worker for its status (TensorFlow's `WorkerService/GetStatus`) within a deadline.

    A stopped or hung process does not answer, even though its listening socket still
    accepts TCP connections.

    Args:
        address: the worker's `host:port`.
        timeout_s: the deadline in seconds.
        channel: an open `grpc.Channel` to `address` to reuse; None opens and closes one.

    Returns:
        None when the worker answered; otherwise what went wrong, in words.
    """
    import grpc

    own = channel is None
    if own:
        channel = grpc.insecure_channel(address)
    try:
        channel.unary_unary(_STATUS_METHOD)(b"", timeout=max(timeout_s, 0.001))
        return None
    except grpc.RpcError as err:
        code = err.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return (f"no answer to a status call within {timeout_s:.1f} s (the process may be "
                    "stopped, hung or overloaded)")
        if code == grpc.StatusCode.UNAVAILABLE:
            return f"unreachable ({(err.details() or 'unavailable').splitlines()[0]})"
        return f"status call failed: {code.name} {err.details()}"
    finally:
        if own:
            channel.close()


def wait_for_workers(addresses: Sequence[str], timeout_s: float) -> None:
    """Waits until every worker answers a status call (workers may still be starting).

    Args:
        addresses: the workers' `host:port`, task 0 first.
        timeout_s: how long to wait in all, in seconds.

    Raises:
        WorkerUnavailableError: naming the first worker that did not answer in time.
    """
    deadline = time.monotonic() + timeout_s
    for task, address in enumerate(addresses):
        while True:
            remaining = deadline - time.monotonic()
            reason = probe(address, max(min(remaining, 2.0), 0.05))
            if reason is None:
                break
            if time.monotonic() >= deadline:
                raise WorkerUnavailableError(
                    f"Worker task {task} at {address} did not answer within {timeout_s:.1f} s: "
                    f"{reason}. Start it with `tfpipe worker --cluster {','.join(addresses)} "
                    f"--task {task}` (or resume it if it is stopped), check the host and port "
                    "are reachable from here, or pass a longer timeout_s.",
                    address=address, task=task, reason=reason,
                )
            time.sleep(0.1)


# client -----------------------------------------------------------------------------------


def cluster(
    spec: str | Sequence[str] | None = None,
    *,
    threads: int | None = None,
    timeout_s: float = 30.0,
) -> list[str]:
    """Connects this process to running `tfpipe worker`s and returns their devices.

    Pass the result as `devices=` to `tfpipe.fit` or `tfpipe.Pipeline`: each stage's
    variables, optimizer slots, forward, backward and updates then live and run on its
    worker, and this process only feeds data and runs the Keras loop.

    Args:
        spec: the workers, `"host:port,host:port"` or a list, task 0 first, exactly as given
            to `tfpipe worker --cluster`; None reads the `"worker"` job of `TF_CONFIG`.
        threads: if given, the intra- and inter-op thread pool sizes of this process, set
            before connecting. The workers run this process's work with this process's
            settings, so this is what limits each worker to N threads (a worker's own
            `--threads` does not). Needs TensorFlow not yet initialised in this process,
            unless it already has these values.
        timeout_s: how long to wait for every worker to answer before connecting.

    Returns:
        The workers' devices in task order: each worker's GPUs, or its `CPU:0` when it has
        none, such as
        `["/job:worker/replica:0/task:0/device:CPU:0",
        "/job:worker/replica:0/task:1/device:CPU:0"]`.

    Raises:
        PipelineError: for a malformed spec or `TF_CONFIG`, or bad `threads`.
        DeviceConfigurationError: when `threads` differs from the thread limits TensorFlow
            already initialised with in this process.
        WorkerUnavailableError: when a worker does not answer within `timeout_s`.

    Example:
        >>> devices = tfpipe.cluster("h1:2222,h2:2222", threads=8)
        >>> tfpipe.fit(model, x, y, batch_size=256, devices=devices, micro_batches=8)
    """
    addresses = parse_addresses(spec)
    _check_threads(threads)
    if threads is not None:
        _set_client_threads(threads)
    wait_for_workers(addresses, timeout_s)
    tf.config.experimental_connect_to_cluster(tf.train.ClusterSpec({JOB: addresses}))
    _connected[:] = addresses
    return worker_devices(JOB)


def _set_client_threads(threads: int) -> None:
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as err:
        have = (tf.config.threading.get_intra_op_parallelism_threads(),
                tf.config.threading.get_inter_op_parallelism_threads())
        raise DeviceConfigurationError(
            f"tfpipe.cluster(threads={threads}) was called after TensorFlow initialised in this "
            f"process with intra/inter-op threads {have} (0 = TensorFlow's choice). Call "
            "tfpipe.cluster(...) at the top of the script, before creating any tensor, model "
            "or dataset, or leave threads out."
        ) from err


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
            if not _connected:
                raise PipelineError(
                    "Watchdog() without addresses watches the cluster of the latest "
                    "tfpipe.cluster(...) call, but none was made: call tfpipe.cluster first, or "
                    "pass addresses='host:port,host:port'."
                )
            addresses = list(_connected)
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
        stages: dict[str, list[int]] = {}
        for stage in pipeline.stages:
            spec = tf.DeviceSpec.from_string(stage.device)
            if spec.job == JOB and spec.task is not None and spec.task < len(addresses):
                stages.setdefault(addresses[spec.task], []).append(stage.index)
        return cls(addresses, timeout_s, stages, **kwargs)

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
        if error is None and isinstance(exc, tf.errors.OpError):
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
        results: dict[str, str | None] = {}

        def check(a: str) -> None:
            results[a] = probe(a, min(self.timeout_s, 2.0))

        checks = [threading.Thread(target=check, args=(a,), daemon=True) for a in self.addresses]
        for t in checks:
            t.start()
        for t in checks:
            t.join(timeout=min(self.timeout_s, 2.0) + 1.0)
        for address in self.addresses:
            reason = results.get(address, "no answer to a status call")
            if reason is not None:
                return self._error(address, f"{reason}; the step failed with {summary}")
        if isinstance(exc, tf.errors.UnavailableError):
            match = _TASK_IN_MESSAGE.search(str(exc))
            if match and int(match.group(1)) < len(self.addresses):
                address = self.addresses[int(match.group(1))]
                return self._error(address, f"the connection to it failed ({summary}); it "
                                            "answers status calls now, so the failure may "
                                            "have been transient")
        return None

    def _error(self, address: str, reason: str) -> WorkerUnavailableError:
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
