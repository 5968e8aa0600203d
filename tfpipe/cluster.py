"""Pipeline stages on TensorFlow's distributed runtime: worker processes and connecting to them.

Design:
- A worker is a plain `tf.distribute.Server` for one task of the job `"worker"` (`serve`,
  behind `tfpipe worker`). The client connects with
  `tf.config.experimental_connect_to_cluster` (`cluster`) and gets the workers' device names,
  which `Pipeline` / `tfpipe.fit` take as `devices=` like local ones: placement, forward,
  backward and optimizer updates then run on the workers.
- Thread limits of the pools that run the client's work on a worker are the *client's*
  settings (the client's config travels with its remote context); a worker's own
  `ConfigProto` does not hold them. `cluster(threads=N)` therefore sets the client's limits
  before connecting: N intra-op threads and N + 1 inter-op threads. The extra one is for
  hand-overs: TensorFlow's executor counts a `_Send` on a CPU as an expensive op, queues it
  on the inter-op pool and runs the compute that became ready with it inline, so with one
  inter-op thread a stage's output left its worker only once that worker had nothing else
  to run (the next stage idled for a forward per hand-over). A worker's cores are bounded by
  `tfpipe worker --cpus`, not by its threads.
- Health and interrupting a blocked step: `tfpipe.watchdog` (`Watchdog`). The status call
  itself (`probe`) and the record of the connected cluster live in `tfpipe.health`, below
  the front layer, so that a failed step's error translation (`tfpipe.oom`) can use them.
- Out of memory: `tfpipe worker` starts a sentinel beside itself (`tfpipe.sentinel`) that
  reports on the worker's port when the kernel killed the worker for memory; connecting to
  such a worker raises `WorkerOutOfMemoryError` at once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

import tensorflow as tf

from tfpipe.devices import worker_devices
from tfpipe.errors import DeviceConfigurationError, PipelineError, WorkerUnavailableError
from tfpipe.health import connected_addresses as connected_addresses  # re-exported
from tfpipe.health import probe as probe  # re-exported: tfpipe.cluster.probe
from tfpipe.health import set_connected
from tfpipe.oom import worker_error
from tfpipe.oom_report import parse as parse_report

JOB = "worker"
"""The job name of `tfpipe worker` processes: devices are `/job:worker/replica:0/task:i/...`."""

EXIT_WORKER_UNAVAILABLE = 75
"""Exit status of a process the watchdog ended because a blocked step could not be interrupted
(75 is `EX_TEMPFAIL`: a temporary failure, try again)."""

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


def wait_for_workers(addresses: Sequence[str], timeout_s: float) -> None:
    """Waits until every worker answers a status call (workers may still be starting).

    Args:
        addresses: the workers' `host:port`, task 0 first.
        timeout_s: how long to wait in all, in seconds.

    Raises:
        WorkerUnavailableError: naming the first worker that did not answer in time.
        WorkerOutOfMemoryError: at once, for a worker whose out-of-memory sentinel reports
            that the kernel killed it for memory (`tfpipe.sentinel`).
    """
    deadline = time.monotonic() + timeout_s
    for task, address in enumerate(addresses):
        while True:
            remaining = deadline - time.monotonic()
            reason = probe(address, max(min(remaining, 2.0), 0.05))
            if reason is None:
                break
            report = parse_report(reason)
            if report is not None:  # its sentinel answers: the kernel killed it for memory
                raise worker_error(report, addresses)
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
        threads: if given, N intra-op threads (the threads of one matrix product) and
            N + 1 inter-op threads (ops run at once: one more, so that a worker sends a
            tensor while it computes) for this process, set before connecting. The workers
            run this process's work with this process's settings, so this is what limits
            each worker's threads (a worker's own `--threads` does not; its cores:
            `tfpipe worker --cpus`). Needs TensorFlow not yet initialised in this process,
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
    set_connected(addresses)
    return worker_devices(JOB)


def _set_client_threads(threads: int) -> None:
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads + 1)  # + 1: hand-overs
    except RuntimeError as err:
        have = (tf.config.threading.get_intra_op_parallelism_threads(),
                tf.config.threading.get_inter_op_parallelism_threads())
        raise DeviceConfigurationError(
            f"tfpipe.cluster(threads={threads}) was called after TensorFlow initialised in this "
            f"process with intra/inter-op threads {have} (0 = TensorFlow's choice). Call "
            "tfpipe.cluster(...) at the top of the script, before creating any tensor, model "
            "or dataset, or leave threads out."
        ) from err
