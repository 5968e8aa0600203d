"""The workers' scheduler slices: a hand-over from a busy worker, and a pipeline, at two lengths.

Why: under Linux's EEVDF scheduler (6.6+) a thread woken on a core whose thread runs a
kernel waits for that thread's slice to end (1.4 ms by default on this project's machines,
often two) before it runs. On a one-core worker the thread that sends a stage's output is
such a thread, so a tensor left a busy worker 3-4 ms after it was made. Linux 6.12+ lets a
process choose a fair-class thread's slice (`sched_setattr`'s runtime, 0.1-100 ms, inherited
by new threads); this script measures what the least one changes. Measured 2026-12-06: the
hand-over 0.2-1.3 ms instead of 3.4-4.2, the pipelines' steps unchanged within the noise (so
`tfpipe worker` keeps the default; docs/benchmarks.md).

Two pinned one-core `tfpipe worker` processes and this process as their client
(`tfpipe.cluster(threads=1)`). Each round sets every thread of both workers to the kernel's
default slice (this process's own, read before anything changes it) and to 0.1 ms, in turn,
and times at each:

- `hop idle` / `hop busy`: a batch/M x 1024 float32 tensor made on worker 0 (the last of 4
  products) and read on worker 1, with worker 0 idle afterwards or going on with 4 more
  products that do not need the read; the time from the tensor being made to its read, by
  `tf.timestamp` on both workers (one machine, one clock), median of `--hops` calls;
- `sequential`: the peer model's M micro-batches in sequence on worker 0, and `pipeline`:
  the model on the two workers (`--schedule`, default 1F1B; `--chunks` per worker), ms per
  step (per-run means of `--steps` steps).

Usage:
    python -m benchmarks.slices [--batch 2048] [--micro-batches 8] [--schedule 1f1b]
        [--chunks C] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import platform
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # this process imports tfpipe, so TensorFlow
if not __package__:  # `python benchmarks/slices.py`: import its folder as the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.speed_table import (
    add_timing_args,
    check_timing,
    load_line,
    median,
    quick_timing,
    write_json,
)
from tfpipe import processes

SHORT_SLICE_NS = 100_000  # Linux's least (`sched_setattr`'s runtime is clamped to 0.1-100 ms)
_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}  # syscall numbers (asm-generic: 274)
_KEEP_POLICY = 0x08  # SCHED_FLAG_KEEP_POLICY


def set_slices(pid: int, slice_ns: int = SHORT_SLICE_NS) -> str | None:
    """Gives every thread of process `pid` a scheduler slice of `slice_ns` nanoseconds,
    keeping each thread's policy and nice; threads the process makes later inherit it.

    Args:
        pid: the process (this one: `os.getpid()`; another needs the rights to renice it).
        slice_ns: the slice, 100,000 to 100,000,000 (the kernel clamps it).

    Returns:
        None when set, else why not (another OS or architecture, or a kernel that refuses).

    Example:
        >>> set_slices(os.getpid())  # None on Linux 6.12+ on x86_64 or aarch64
    """
    number = _SCHED_SETATTR.get(platform.machine())
    if number is None or not sys.platform.startswith("linux"):
        return f"no sched_setattr on {sys.platform} {platform.machine()}"
    libc = ctypes.CDLL(None, use_errno=True)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            nice = os.getpriority(os.PRIO_PROCESS, int(tid))
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
        # struct sched_attr, first version (48 bytes): size, policy, flags, nice, priority,
        # runtime (a fair-class thread's slice), deadline, period
        attr = struct.pack("IIQiIQQQ", 48, 0, _KEEP_POLICY, nice, 0, slice_ns, 0, 0)
        if libc.syscall(number, int(tid), ctypes.create_string_buffer(attr), 0) != 0:
            err = ctypes.get_errno()
            if err != errno.ESRCH:
                return f"sched_setattr: {os.strerror(err)}"
    return None


def slices(pid: int) -> dict[int, int]:
    """Each thread's scheduler slice in nanoseconds, by thread id (Linux `/proc/PID/task/TID/
    sched`, `se.slice`); empty where the kernel does not show it."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "sched").read_text()
        except OSError:  # a thread that ended meanwhile
            continue
        for line in text.splitlines():
            if line.startswith("se.slice"):
                found[int(task.name)] = int(float(line.split(":")[1]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_args(parser, "a smoke run: batch 256, M = 2, 2 rounds of 1 run of 2 steps",
                    "/tmp/tfpipe-bench/slices.json")
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--schedule", default="1f1b", help="the two-worker pipeline's schedule")
    parser.add_argument("--chunks", type=int, default=None,
                        help="model chunks per worker (interleaved, looped-bfs, ...)")
    parser.add_argument("--hops", type=int, default=30, help="timed calls per hop probe visit")
    args = parser.parse_args()
    quick_timing(args)
    check_timing(parser, args)
    if args.quick:
        args.batch, args.micro_batches, args.hops = 256, 2, 5
    default = slices(os.getpid()).get(os.getpid())
    if default is None:
        sys.exit("this kernel shows no scheduler slices (/proc/PID/sched se.slice): nothing "
                 "to compare")
    processes.raise_on_signals()  # SIGTERM and SIGINT: the finally below ends the workers
    pool = processes.WorkerPool(Path(tempfile.mkdtemp(prefix="tfpipe-slices-")), pin=True)
    report: dict[str, Any] = {"args": vars(args), "load_before": os.getloadavg(),
                              "default_slice_ns": default}
    try:
        addresses, _ = pool.start(2)
        report["worker_slices_at_start"] = [sorted(set(slices(p).values()))
                                            for p in pool.pids]
        times = _rounds(args, addresses, pool.pids, {"default": default,
                                                     "0.1 ms": SHORT_SLICE_NS})
    finally:
        pool.stop_all()
    report["load_after"] = os.getloadavg()
    report["times_ms"] = times
    print(f"[slices] the workers' threads at start: {report['worker_slices_at_start']} ns; "
          f"this kernel's default {default} ns")
    name = args.schedule + (f" x{args.chunks}" if args.chunks else "")
    print(f"{'slice':8} {'hop idle':>9} {'hop busy':>9} {'sequential':>11} {name:>14} "
          f"{'vs seq':>7}   (ms, medians; batch {args.batch}, M = {args.micro_batches})")
    for label, t in times.items():
        seq, piped = median(t["sequential"]), median(t["pipeline"])
        print(f"{label:8} {median(t['hop idle']):9.2f} {median(t['hop busy']):9.2f} "
              f"{seq:11.1f} {piped:14.1f} {seq / piped:7.2f}")
    print(load_line(report["load_before"], report["load_after"]))
    write_json(args.json, report)


def _rounds(args: argparse.Namespace, addresses: list[str], pids: list[int],
            lengths: dict[str, int]) -> dict[str, dict[str, list[float]]]:
    """Every configuration at every slice length, the lengths alternating within each round."""
    import tfpipe

    d0, d1 = tfpipe.cluster(addresses, threads=1, timeout_s=60)
    from benchmarks.common import compiled, data_for
    from benchmarks.workers import WIDTH, Runner

    data = data_for("mlp", args.batch, 8)
    m = args.micro_batches
    pipes = {"sequential": tfpipe.Pipeline(compiled("mlp"), stages=1, devices=[d0],
                                           micro_batches=m),
             "pipeline": tfpipe.Pipeline(compiled("mlp"), stages=2, devices=[d0, d1],
                                         micro_batches=m, schedule=args.schedule,
                                         chunks=args.chunks)}
    runners = {name: Runner(lambda n, cb, p=p: p.fit(data, steps_per_epoch=n, epochs=1,
                                                     verbose=0, callbacks=[cb]))
               for name, p in pipes.items()}
    hops = {f"hop {kind}": _hop(d0, d1, (args.batch // m, WIDTH), kind == "busy")
            for kind in ("idle", "busy")}
    times: dict[str, dict[str, list[float]]] = {label: {} for label in lengths}
    for r in range(args.rounds):
        order = list(lengths.items())
        for label, length in order if r % 2 == 0 else order[::-1]:
            for pid in pids:
                unset = set_slices(pid, length)
                if unset:
                    sys.exit(f"cannot set the workers' slices: {unset}")
                if set(slices(pid).values()) != {length}:
                    sys.exit(f"worker {pid}'s threads have slices {slices(pid)}, not {length}")
            for name, hop in hops.items():
                times[label].setdefault(name, []).append(hop(args.hops))
            for name, runner in runners.items():
                times[label].setdefault(name, []).extend(
                    runner.visit(args.warmup, args.runs, args.steps))
        print(f"[round {r + 1}/{args.rounds}] load {os.getloadavg()[0]:.2f}", flush=True)
    return times


def _hop(d0: str, d1: str, shape: tuple[int, int], busy: bool) -> Callable[[int], float]:
    """`calls` -> the median over that many calls of the ms from a tensor of `shape` made on
    `d0` to its read on `d1`, with `d0` idle after making it or (`busy`) computing 4 more
    products that do not need the read."""
    import tensorflow as tf

    with tf.device(d0):
        x = tf.Variable(tf.random.normal(shape))
        width = shape[1]
        weights = [tf.Variable(tf.random.normal((width, width)) * 0.03) for _ in range(4)]
    with tf.device(d1):
        one = tf.Variable(1.0)

    def products(h: tf.Tensor) -> tf.Tensor:
        for w in weights:
            h = tf.nn.relu(h @ w)
        return h

    @tf.function  # type: ignore[untyped-decorator]  # TensorFlow ships no type hints
    def hand_over() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        with tf.device(d0):
            a = products(x * 1.0)
            with tf.control_dependencies([a]):
                made = tf.timestamp()
            with tf.control_dependencies([made]):  # after `a`, independent of the read
                more = tf.reduce_sum(products(x * 2.0)) if busy else tf.constant(0.0)
        with tf.device(d1):
            seen = tf.reduce_sum(a * one)
            with tf.control_dependencies([seen]):
                read = tf.timestamp()
        return made, read, more

    def timed(calls: int) -> float:
        for _ in range(2):
            hand_over()
        out = []
        for _ in range(calls):
            made, read, _ = hand_over()
            out.append(1e3 * float(read - made))
        return median(out)

    return timed


if __name__ == "__main__":
    main()
