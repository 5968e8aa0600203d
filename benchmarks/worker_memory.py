"""Issue #7: peak activation memory per stage, one `tfpipe worker` process per stage.

Logical CPU devices share one allocator (benchmarks/schedule_memory.py and
recompute_memory.py measure whole-pipeline peaks), so this script gives every stage its own
process: it starts K one-thread `python -m tfpipe worker` processes on free loopback ports,
connects to them with `tfpipe.cluster(..., threads=1)`, and trains, for each configuration
(schedule x recompute mode), a fresh copy of a deep MLP whose activations dominate its
memory (`--layers` x Dense(width, relu) + Dense(10), a large batch, a narrow width; SGD).

Measurement: TensorFlow's allocator statistics are asked for on each worker's device first
(`tfpipe.allocator`); TensorFlow 2.21 keeps none for remote devices, so the figure is then
each worker process's peak resident set size:
`VmHWM` in `/proc/<pid>/status`, reset to the current resident size by writing "5" to
`/proc/<pid>/clear_refs` (Linux). Per configuration: one warm-up step (places the variables,
traces the step), then `--repeats` times: read each worker's resident size (the baseline:
variables, TensorFlow, gRPC), reset its peak, run one training step, read its peak. The
figure is the median over the repeats of peak - baseline: the memory one step added on that
stage, i.e. its activations and transient buffers. For the resident size to follow what
TensorFlow holds, the workers run with oneDNN off (`TF_ENABLE_ONEDNN_OPTS=0`; oneDNN's CPU
allocator, on by default on x86, keeps freed memory in a pool that never shrinks, so a step
after the warm-up added nothing) and with glibc's `MALLOC_MMAP_THRESHOLD_` fixed
(`--mmap-threshold`, 64 KiB by default; glibc otherwise keeps freed blocks for reuse, and a
step read about half of what it held). A calibration before the configurations runs a
function that holds 32 MiB on every worker at once and prints what the method reads for it.

Theory (K stages, M micro-batches, stage k counted from 0): GPipe keeps all M micro-batches'
activations on every stage; 1F1B at most min(K - k, M) on stage k (the counts come from
`tfpipe.schedules.peak_in_flight`); a recomputed stage keeps only its input per micro-batch
in flight, plus one micro-batch's activations while it replays the forward in a backward.
The "theory" rows price that with one rows x width float32 tensor per Dense layer per
micro-batch (the layer's input, which its backward needs), rows = batch / M: a lower bound, as
it leaves out the transient tensors of a forward and a backward and the boundary buffers.
Note that tfpipe runs GPipe as plain dataflow (no backward is held back until every forward
ran), so a stage near the end may start backwards early and hold fewer than M.

Workers are always ended at the end (SIGCONT, SIGTERM, then SIGKILL), also on an error,
SIGTERM or Ctrl-C; waiting for them to start is bounded, and a timer ends them after
`--timeout` seconds, which makes a blocked step fail at once.

Usage:
    python -m benchmarks.worker_memory [--quick] [--stages 4] [--micro-batches 8]
        [--batch 16384] [--width 128] [--layers 32] [--repeats 3]
        [--configs gpipe:never,1f1b:never,1f1b:except_last,1f1b:always,gpipe:always]
        [--mmap-threshold 65536] [--onednn] [--timeout 900] [--json out/worker_memory.json]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if not __package__:  # `python benchmarks/worker_memory.py`: import its folder as the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.speed_table import load_line, median, write_json
from tfpipe import processes

CONFIGS = "gpipe:never,1f1b:never,1f1b:except_last,1f1b:always,gpipe:always"
MIB = 2**20


# worker processes ---------------------------------------------------------------------------


def worker_pool(logs: Path, mmap_threshold: int, onednn: bool = False) -> processes.WorkerPool:
    """A pool of one-thread `tfpipe worker`s logging to `logs` (see `tfpipe.processes`).

    Without `onednn`, the workers run with TensorFlow's oneDNN optimisations off, which
    gives them TensorFlow's plain CPU allocator (malloc); with `mmap_threshold` > 0, glibc
    returns every allocation of at least that many bytes to the system when it is freed.
    """
    env = processes.worker_env()
    if not onednn:
        env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    if mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    return processes.WorkerPool(logs, env=env, threads=1)


def _status_kib(pid: int, field: str) -> int:
    """A `kB` field of `/proc/<pid>/status`, such as VmRSS or VmHWM."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


class PeakRss:
    """Peak resident set size of processes, resettable (Linux `/proc`)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def current_mib(self) -> list[float]:
        return [_status_kib(pid, "VmRSS") / 1024 for pid in self.pids]

    def reset(self) -> None:
        """Sets each process's peak (VmHWM) to its current resident size."""
        for pid in self.pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")

    def peak_mib(self) -> list[float]:
        return [_status_kib(pid, "VmHWM") / 1024 for pid in self.pids]


def allocator_stats(devices: list[str]) -> str | None:
    """None when TensorFlow reports allocator statistics for every device, else why not."""
    from tfpipe import allocator

    return next(filter(None, map(allocator.unavailable, devices)), None)


# the measurement ----------------------------------------------------------------------------


def calibrate(devices: list[str], rss: PeakRss, mib: int = 32) -> list[float]:
    """What the method reads for a function that holds `mib` 1-MiB tensors at once on every
    worker (their sum needs all of them): MiB added per worker, expected about `mib` + 1."""
    import tensorflow as tf

    @tf.function(autograph=False)
    def hold() -> Any:
        sums = []
        for device in devices:
            with tf.device(device):
                parts = [tf.random.normal((1024, 256), seed=i) for i in range(mib)]
                sums.append(tf.reduce_sum(tf.add_n(parts)))
        return tf.add_n(sums)

    hold()
    base = rss.current_mib()
    rss.reset()
    hold()
    return [p - b for p, b in zip(rss.peak_mib(), base)]



def measure(pipe: Any, rss: PeakRss, x: Any, y: Any, repeats: int) -> dict[str, Any]:
    """One warm-up step, then per repeat: each worker's peak - baseline of one step (MiB)."""
    fit = dict(batch_size=len(x), epochs=1, verbose=0)
    pipe.fit(x, y, **fit)  # traces the step and warms up
    added: list[list[float]] = []
    baselines: list[list[float]] = []
    times = []
    for _ in range(repeats):
        gc.collect()
        base = rss.current_mib()
        rss.reset()
        start = time.perf_counter()
        pipe.fit(x, y, **fit)
        times.append(time.perf_counter() - start)
        peak = rss.peak_mib()
        baselines.append(base)
        added.append([p - b for p, b in zip(peak, base)])
    stages = len(rss.pids)
    return {
        "peak_mib": [median([a[k] for a in added]) for k in range(stages)],
        "runs_mib": added,
        "baseline_mib": [median([b[k] for b in baselines]) for k in range(stages)],
        "step_s": median(times),
    }


# not tfpipe.planner.costs's Estimate.peak_bytes: that is a device's state + profiled inputs and
# outputs; this is the lower bound the table compares against, one Dense input per layer.
def model_mib(pipe: Any, rows: int, width: int) -> list[float]:
    """The theory's figure per stage (MiB): one rows x width float32 tensor (a Dense layer's
    input) per Dense layer per micro-batch in flight; a recomputed stage keeps one (its
    input) per micro-batch in flight plus one micro-batch's layers while it replays."""
    import tfpipe

    in_flight = tfpipe.schedules.peak_in_flight(pipe.schedule)
    tensor = rows * width * 4 / MIB
    out = []
    for st, n, recomputed in zip(pipe.stages, in_flight, pipe.recompute):
        layers = sum(1 for layer in st.layers if layer.__class__.__name__ == "Dense")
        out.append(tensor * (n + layers if recomputed else n * layers))
    return out


def run(args: argparse.Namespace, devices: list[str], rss: PeakRss) -> list[dict[str, Any]]:
    """Measures every configuration, in the order given."""
    import tfpipe
    from benchmarks.common import deep_mlp, wide_data

    x, y = wide_data(args.batch, args.width)
    results = []
    for config in args.configs.split(","):
        schedule, _, recompute = config.partition(":")
        pipe = tfpipe.Pipeline(
            deep_mlp(args.width, args.layers), stages=args.stages, devices=devices,
            micro_batches=args.micro_batches, schedule=schedule, recompute=recompute or "never",
        )
        kernel = pipe.stages[-1].trainable_variables[0]
        assert kernel.value.device == devices[-1], (kernel.value.device, devices[-1])
        t0 = time.monotonic()
        result = measure(pipe, rss, x, y, args.repeats)
        result.update(
            config=config, schedule=schedule, recompute=recompute or "never",
            in_flight=list(tfpipe.schedules.peak_in_flight(pipe.schedule)),
            recomputed=list(pipe.recompute),
            model_mib=model_mib(pipe, args.batch // args.micro_batches, args.width),
            stage_layers=[len(st.layers) for st in pipe.stages],
        )
        results.append(result)
        print(f"[{config}] {time.monotonic() - t0:.0f} s, peak MiB per stage "
              f"{[round(p, 1) for p in result['peak_mib']]}", flush=True)
        del pipe, kernel
        gc.collect()
    return results


# the table ----------------------------------------------------------------------------------


def table(results: list[dict[str, Any]]) -> list[str]:
    """Measured peak per stage, its ratio to the first configuration, and the theory's."""
    k = len(results[0]["peak_mib"])
    first = results[0]
    head = f"vs {first['config']}"
    width = max(len(head), 6 * k - 1)
    stages = "".join(f"{'stage ' + str(s):>9}" for s in range(k))
    lines = [f"{'config':<18}{stages}   {head:<{width}}   step s"]
    for r in results:
        r["ratio"] = [p / b if b > 0 else None for p, b in zip(r["peak_mib"], first["peak_mib"])]
        r["model_ratio"] = [p / b for p, b in zip(r["model_mib"], first["model_mib"])]
        ratios = " ".join("  -  " if q is None else f"{q:5.2f}" for q in r["ratio"])
        lines.append(f"{r['config']:<18}" + "".join(f"{p:9.1f}" for p in r["peak_mib"])
                     + f"   {ratios:<{width}}   {r['step_s']:6.2f}")
    lines.append("theory (model MiB per stage; ratio; micro-batches in flight per stage)")
    for r in results:
        ratios = " ".join(f"{q:5.2f}" for q in r["model_ratio"])
        lines.append(
            f"{r['config']:<18}" + "".join(f"{p:9.1f}" for p in r["model_mib"])
            + f"   {ratios:<{width}}   in flight {r['in_flight']}, recomputed "
            + str([int(f) for f in r["recomputed"]])
        )
    return lines


# entry point --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=None, help="workers = stages (default 4)")
    parser.add_argument("--micro-batches", type=int, default=None, help="default 8")
    parser.add_argument("--batch", type=int, default=None, help="default 16384")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=None, help="default 32")
    parser.add_argument("--repeats", type=int, default=None, help="default 3")
    parser.add_argument("--configs", default=CONFIGS, help="schedule:recompute, comma-separated")
    parser.add_argument("--mmap-threshold", type=int, default=65536,
                        help="MALLOC_MMAP_THRESHOLD_ of the workers in bytes; 0 leaves glibc's")
    parser.add_argument("--onednn", action="store_true",
                        help="leave oneDNN on in the workers: its allocator pools freed memory "
                        "and never shrinks, so the figures then show only growth of the pool")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="end the workers (and so the run) after this many seconds")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2 workers, M=4, batch 2048, 8 layers, 1 repeat")
    parser.add_argument("--json", "--out", dest="json", default="out/worker_memory.json")
    args = parser.parse_args()
    quick = dict(stages=2, micro_batches=4, batch=2048, layers=8, repeats=1)
    full = dict(stages=4, micro_batches=8, batch=16384, layers=32, repeats=3)
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.stages, args.micro_batches, args.repeats) < 1:
        parser.error("--stages, --micro-batches and --repeats must be at least 1")
    if args.batch % args.micro_batches:
        parser.error("--batch must be a multiple of --micro-batches")

    processes.raise_on_signals()  # so the finally below ends the workers
    logs = Path(tempfile.mkdtemp(prefix="tfpipe-worker-memory-"))
    pool = worker_pool(logs, args.mmap_threshold, args.onednn)
    report: dict[str, Any] = {"args": vars(args), "load_before": os.getloadavg()}

    timer = threading.Timer(args.timeout, pool.stop_all)
    timer.daemon = True
    timer.start()
    try:
        addresses, _ = pool.start(args.stages)
        import tfpipe

        devices = tfpipe.cluster(addresses, threads=1, timeout_s=60)  # before TF starts
        why_not = allocator_stats(devices)
        report["measure"] = "peak RSS (VmHWM)"
        report["allocator_stats"] = why_not or "available"
        print(f"[workers] {addresses}, pids {pool.pids}, logs in {logs}", flush=True)
        print(f"[measure] allocator statistics on the workers: {why_not or 'available'}; "
              "using each worker's peak RSS (VmHWM, reset through /proc/<pid>/clear_refs)",
              flush=True)
        report["devices"] = devices
        rss = PeakRss(pool.pids)
        report["calibration_mib"] = calibrate(devices, rss)
        print("[calibration] a function holding 32 MiB on each worker read as "
              f"{[round(c, 1) for c in report['calibration_mib']]} MiB", flush=True)
        report["results"] = run(args, devices, rss)
    finally:
        timer.cancel()
        pool.stop_all()
    report["processes"] = {"pids": pool.pids,
                           "exit_status": [p.returncode for p in pool.processes]}
    report["load_after"] = os.getloadavg()

    print(f"K={args.stages} M={args.micro_batches} batch={args.batch} width={args.width} "
          f"layers={args.layers}; MiB one training step added to each worker's resident set "
          f"(peak RSS - RSS before the step), median of {args.repeats}")
    lines = table(report["results"])
    report["table"] = lines
    print("\n".join(lines))
    print(load_line(report["load_before"], report["load_after"]))
    write_json(args.json, report)


if __name__ == "__main__":
    main()
