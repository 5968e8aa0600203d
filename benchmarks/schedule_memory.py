"""Allocator peak of one training step per schedule, on a model whose activations dominate.

Runs each schedule on a fresh copy of the same MLP (K stages, M micro-batches, logical CPU
devices), resets TensorFlow's allocator statistics, runs training steps, and reads the
allocator peak (`tf.config.experimental.get_memory_info`, with `TF_ENABLE_ONEDNN_OPTS=1` set
by the script so that the CPU allocator keeps statistics on every processor). Logical CPU
devices share one allocator, so the figure is the whole pipeline's peak. Also prints the step
time, as a ratio to GPipe measured in the same run.

Usage:
    python -m benchmarks.schedule_memory [--stages 4] [--micro-batches 8] [--batch 4096]
        [--width 256] [--layers 8] [--repeats 3] [--json out/schedule_memory.json]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Allocator statistics on CPU need oneDNN's allocator, which TensorFlow turns on by default only
# on some processors: forced on here, before TensorFlow starts (tfpipe.allocator).
os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"
if not __package__:  # `python benchmarks/schedule_memory.py`: import its folder as the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.speed_table import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--schedules", default="gpipe,1f1b,zb-h1")
    parser.add_argument("--rank-loops", action="store_true",
                        help="run the step as one in-graph loop per rank (rank_loops=True)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import tfpipe

    tfpipe.configure_cpu_devices(args.stages)
    from benchmarks.common import deep_mlp, step_peak, wide_data

    x, y = wide_data(args.batch, args.width)
    results = []
    for name in args.schedules.split(","):
        pipe = tfpipe.Pipeline(
            deep_mlp(args.width, args.layers),
            stages=args.stages,
            micro_batches=args.micro_batches,
            schedule=name,
            rank_loops=args.rank_loops,
        )
        peak, step = step_peak(pipe, x, y, args.repeats)
        results.append(
            {
                "schedule": name,
                "peak_mib": peak,
                "step_s": step,
                "predicted_in_flight": list(tfpipe.schedules.peak_in_flight(pipe.schedule)),
            }
        )

    base = results[0]
    print(
        f"K={args.stages} M={args.micro_batches} batch={args.batch} width={args.width} "
        f"layers={args.layers}, median of {args.repeats}; allocator statistics: oneDNN's CPU "
        f"allocator (TF_ENABLE_ONEDNN_OPTS=1, set by this script)"
    )
    print(
        f"{'schedule':10} {'peak MiB':>9} {'vs ' + base['schedule']:>10} {'step s':>8} "
        f"{'time ratio':>10}  predicted in-flight per stage"
    )
    for r in results:
        r["peak_ratio"] = r["peak_mib"] / base["peak_mib"]
        r["time_ratio"] = r["step_s"] / base["step_s"]
        print(
            f"{r['schedule']:10} {r['peak_mib']:9.1f} {r['peak_ratio']:10.2f} {r['step_s']:8.3f} "
            f"{r['time_ratio']:10.2f}  {r['predicted_in_flight']}"
        )
    write_json(args.json, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
