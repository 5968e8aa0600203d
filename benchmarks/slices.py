"""The workers' scheduler slices: a hand-over from a busy worker, and 1F1B, at two slice lengths.

Two pinned one-core `tfpipe worker` processes (which give their threads the least slice,
0.1 ms: `tfpipe.slices`) and this process as their client (`tfpipe.cluster(threads=1)`).
Each round sets every thread of both workers to the kernel's default slice (this process's
own, read before anything changes it) and to 0.1 ms, in turn, and times at each:

- `hop idle` / `hop busy`: a batch/M x 1024 float32 tensor made on worker 0 (the last of 4
  products) and read on worker 1, with worker 0 idle afterwards or going on with 4 more
  products that do not need the read; the time from the tensor being made to its read, by
  `tf.timestamp` on both workers (one machine, one clock), median of `--hops` calls;
- `sequential`: the peer model's M micro-batches in sequence on worker 0, and `1f1b`: its
  two stages on the two workers, 1F1B, ms per step (per-run means of `--steps` steps).

Usage:
    python -m benchmarks.slices [--batch 2048] [--micro-batches 8] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/slices.py`

from benchmarks.speed_table import (  # noqa: E402
    add_timing_args,
    check_timing,
    load_line,
    median,
    quick_timing,
    write_json,
)
from tfpipe import processes, slices  # noqa: E402

WIDTH = 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_args(parser, "a smoke run: batch 256, M = 2, 2 rounds of 1 run of 2 steps",
                    "/tmp/tfpipe-bench/slices.json")
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--hops", type=int, default=30, help="timed calls per hop probe visit")
    args = parser.parse_args()
    quick_timing(args)
    check_timing(parser, args)
    if args.quick:
        args.batch, args.micro_batches, args.hops = 256, 2, 5
    default = slices.slices(os.getpid()).get(os.getpid())
    if default is None:
        sys.exit("this kernel shows no scheduler slices (/proc/PID/sched se.slice): nothing "
                 "to compare")
    processes.raise_on_signals()  # SIGTERM and SIGINT: the finally below ends the workers
    pool = processes.WorkerPool(Path(tempfile.mkdtemp(prefix="tfpipe-slices-")), pin=True)
    report: dict[str, Any] = {"args": vars(args), "load_before": os.getloadavg(),
                              "default_slice_ns": default}
    try:
        addresses, _ = pool.start(2)
        report["worker_slices_at_start"] = [sorted(set(slices.slices(p).values()))
                                            for p in pool.pids]
        times = _rounds(args, addresses, pool.pids, {"default": default,
                                                     "0.1 ms": slices.SHORT_SLICE_NS})
    finally:
        pool.stop_all()
    report["load_after"] = os.getloadavg()
    report["times_ms"] = times
    print(f"[slices] the workers' threads at start: {report['worker_slices_at_start']} ns; "
          f"this kernel's default {default} ns")
    print(f"{'slice':8} {'hop idle':>9} {'hop busy':>9} {'sequential':>11} {'1f1b':>8} "
          f"{'vs seq':>7}   (ms, medians; batch {args.batch}, M = {args.micro_batches})")
    for label, t in times.items():
        seq, piped = median(t["sequential"]), median(t["1f1b"])
        print(f"{label:8} {median(t['hop idle']):9.2f} {median(t['hop busy']):9.2f} "
              f"{seq:11.1f} {piped:8.1f} {seq / piped:7.2f}")
    print(load_line(report["load_before"], report["load_after"]))
    write_json(args.json, report)


def _rounds(args: argparse.Namespace, addresses: list[str], pids: list[int],
            lengths: dict[str, int]) -> dict[str, dict[str, list[float]]]:
    """Every configuration at every slice length, the lengths alternating within each round."""
    import tfpipe

    d0, d1 = tfpipe.cluster(addresses, threads=1, timeout_s=60)
    from benchmarks.common import compiled, data_for
    from benchmarks.workers import Runner

    data = data_for("mlp", args.batch, 8)
    m = args.micro_batches
    pipes = {"sequential": tfpipe.Pipeline(compiled("mlp"), stages=1, devices=[d0],
                                           micro_batches=m),
             "1f1b": tfpipe.Pipeline(compiled("mlp"), stages=2, devices=[d0, d1],
                                     micro_batches=m, schedule="1f1b")}
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
                unset = slices.set_slices(pid, length)
                if unset:
                    sys.exit(f"cannot set the workers' slices: {unset}")
            for name, hop in hops.items():
                times[label].setdefault(name, []).extend(hop(args.hops))
            for name, runner in runners.items():
                times[label].setdefault(name, []).extend(
                    runner.visit(args.warmup, args.runs, args.steps))
        print(f"[round {r + 1}/{args.rounds}] load {os.getloadavg()[0]:.2f}", flush=True)
    return times


def _hop(d0: str, d1: str, shape: tuple[int, int], busy: bool) -> Callable[[int], list[float]]:
    """`calls` -> ms from a tensor made on `d0` to its read on `d1`, one per call, with `d0`
    idle after making it or (`busy`) computing 4 more products that do not need the read."""
    import tensorflow as tf

    with tf.device(d0):
        x = tf.Variable(tf.random.normal(shape))
        weights = [tf.Variable(tf.random.normal((WIDTH, WIDTH)) * 0.03) for _ in range(4)]
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

    def timed(calls: int) -> list[float]:
        for _ in range(2):
            hand_over()
        out = []
        for _ in range(calls):
            made, read, _ = hand_over()
            out.append(1e3 * float(read - made))
        return [median(out)]

    return timed


if __name__ == "__main__":
    main()
