"""`tfpipe worker`: one worker task of a cluster, on its GPU, beside its out-of-memory sentinel.

Design: the steps run in the only order that works.
1. Usage: the cluster and task come from `--cluster` / `--task` or `TF_CONFIG`; a bad one
   is one line on stderr and exit status 2, before anything starts.
2. A sentinel left on this port by a predecessor the kernel killed for memory
   (`tfpipe.sentinel`) is asked to leave, so that restarting a task on its old port works.
3. `--cpus LIST` pins every thread of the process to those cores before TensorFlow's
   threads start (the ones it makes later inherit the mask).
4. `--gpu I` sets `CUDA_VISIBLE_DEVICES=I` and memory growth (`tfpipe.devices.use_one_gpu`)
   before TensorFlow lists its devices: importing TensorFlow (which `python -m tfpipe` does
   first) does not start CUDA; starting the server does.
5. The sentinel is started as this process's child, so it shares its cgroup, and this
   process stays the TensorFlow server itself (tests signal and restart worker pids).
6. The server runs (`tfpipe.cluster.serve`) until SIGTERM or SIGINT; then the sentinel is
   ended and the process exits with status 0 through `os._exit`: TensorFlow's gRPC server
   has no clean stop, and its threads must not race the interpreter's shutdown.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

from tfpipe import sentinel
from tfpipe.errors import DeviceConfigurationError, PipelineError

EXIT_USAGE = 2
EXIT_FAILURE = 1


def run(args: argparse.Namespace) -> int:
    """Runs `tfpipe worker` with parsed arguments (see `tfpipe.cli`).

    Args:
        args: `cluster`, `task`, `threads`, `cpus`, `gpu` and `oom_report_s`.

    Returns:
        2 for a usage error, 1 when the worker cannot start; on SIGTERM or SIGINT it does
        not return but ends the process with status 0.
    """
    try:
        addresses, task = _cluster_and_task(args)
        if args.cpus is not None:
            pin(args.cpus)  # a PipelineError names the cores it may use
    except (PipelineError, _UsageError) as err:
        return _fail(str(err))
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    port = int(addresses[task].rpartition(":")[2])
    sentinel.dismiss(port)
    import tensorflow as tf  # lazy: TensorFlow loads only when a command needs it

    from tfpipe.cluster import serve
    from tfpipe.devices import use_one_gpu

    if args.gpu is not None:
        try:
            print(f"tfpipe worker {task}: {use_one_gpu(args.gpu)}", file=sys.stderr, flush=True)
        except DeviceConfigurationError as err:
            return _fail(f"--gpu {args.gpu}: {err}", EXIT_FAILURE)
    guard = _start_sentinel(port, addresses[task], task, args.oom_report_s)
    try:
        serve(addresses, task, threads=args.threads, stop=stop,
              on_ready=lambda line: print(line, flush=True))
    except tf.errors.OpError as err:
        first = (err.message or str(err)).strip().splitlines()[0]
        return _fail(f"cannot start task {task} at {addresses[task]}: {first} (is the port in "
                     "use, or the host not this machine?)", EXIT_FAILURE)
    finally:
        if guard is not None:  # the worker stops normally: so does its sentinel
            guard.terminate()
    name = signal.Signals(received[0]).name if received else "request"
    print(f"tfpipe worker {task} stopping on {name}", flush=True)
    sys.stderr.flush()
    os._exit(0)


class _UsageError(Exception):
    """A worker command line that names no task of a cluster."""


def parse_cpus(text: str) -> tuple[int, ...]:
    """argparse type of `--cpus`: `"0"`, `"0-3"`, `"0-3,8"` as sorted core numbers."""
    cores: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            lo, hi = int(first), int(last or first)
            if not 0 <= lo <= hi:
                raise ValueError(part)
            cores.update(range(lo, hi + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be core numbers such as 0, 0-3 or 0-3,8, got {text!r}") from None
    return tuple(sorted(cores))


def pin(cores: Sequence[int]) -> None:
    """Sets the CPU affinity of every thread of this process to `cores` (Linux); threads
    made later inherit it. Call before TensorFlow (or torch) starts its thread pools.

    Raises:
        PipelineError: not Linux, or a core this process may not use (names the ones it may).
    """
    if not hasattr(os, "sched_setaffinity"):
        raise PipelineError("pinning to cores (--cpus) needs Linux's sched_setaffinity")
    allowed = os.sched_getaffinity(0)
    if not cores or not set(cores) <= allowed:
        raise PipelineError(f"--cpus {','.join(map(str, cores))}: this process may use cores "
                            f"{','.join(map(str, sorted(allowed)))} only")
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), set(cores))
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def _cluster_and_task(args: argparse.Namespace) -> tuple[list[str], int]:
    """The cluster's addresses and this worker's task, from the flags or `TF_CONFIG`."""
    from tfpipe.cluster import parse_addresses, tf_config

    if args.cluster is not None:
        addresses = parse_addresses(args.cluster)
        task = args.task
        if task is None:
            raise _UsageError("--cluster needs --task I, this worker's index in it "
                              f"(0 to {len(addresses) - 1})")
    else:
        addresses, task = tf_config()
        if args.task is not None:
            task = args.task
        if task is None:
            raise _UsageError('TF_CONFIG has no worker task for this process: set its "task": '
                              '{"type": "worker", "index": I}, or pass --task I')
    if task >= len(addresses):
        raise _UsageError(f"--task {task} is not in the cluster {','.join(addresses)}: use 0 "
                          f"to {len(addresses) - 1}")
    return addresses, task


def _start_sentinel(port: int, address: str, task: int,
                    ttl_s: float) -> subprocess.Popen[bytes] | None:
    """The sentinel's process, or None when turned off (`--oom-report-s 0`) or unsupported."""
    if ttl_s <= 0 or not sentinel.supported():
        return None
    return sentinel.start(port, address, task, ttl_s)


def _fail(message: str, status: int = EXIT_USAGE) -> int:
    print(f"tfpipe worker: error: {message}", file=sys.stderr)
    return status
