"""Allocator peak and step time of one training step for each recompute mode.

A deep MLP whose activations dominate (`--layers` x Dense(width, relu), a large batch, a
narrow width), K stages on logical CPU devices, M micro-batches, 1F1B by default (with GPipe
every micro-batch's stage inputs stay alive, which recomputation cannot remove). Logical CPU
devices share one allocator: the figure is the whole pipeline's peak (allocator statistics,
with `TF_ENABLE_ONEDNN_OPTS=1` set by the script so that the CPU allocator keeps them on every
processor). Modes: "never",
"except_last", "always"; ratios are to "never", measured in the same run.

Usage:
    python -m benchmarks.recompute_memory [--stages 4] [--micro-batches 8] [--batch 16384]
        [--width 128] [--layers 32] [--schedule 1f1b] [--repeats 3] [--json out/recompute.json]
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
if not __package__:  # `python benchmarks/recompute_memory.py`: import its folder as the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.speed_table import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import tfpipe

    tfpipe.configure_cpu_devices(args.stages)
    from benchmarks.common import deep_mlp, step_peak, wide_data

    x, y = wide_data(args.batch, args.width)
    results = []
    for mode in ("never", "except_last", "always"):
        pipe = tfpipe.Pipeline(
            deep_mlp(args.width, args.layers),
            stages=args.stages,
            micro_batches=args.micro_batches,
            schedule=args.schedule,
            recompute=mode,
        )
        peak, step = step_peak(pipe, x, y, args.repeats)
        results.append({"recompute": mode, "peak_mib": peak, "step_s": step})

    print(
        f"K={args.stages} M={args.micro_batches} schedule={args.schedule} batch={args.batch} "
        f"width={args.width} layers={args.layers}, median of {args.repeats}; allocator "
        f"statistics: oneDNN's CPU allocator (TF_ENABLE_ONEDNN_OPTS=1, set by this script)"
    )
    print(f"{'recompute':12} {'peak MiB':>9} {'vs never':>9} {'step s':>8} {'time ratio':>10}")
    for r in results:
        r["peak_ratio"] = r["peak_mib"] / results[0]["peak_mib"]
        r["time_ratio"] = r["step_s"] / results[0]["step_s"]
        print(
            f"{r['recompute']:12} {r['peak_mib']:9.1f} {r['peak_ratio']:9.2f} {r['step_s']:8.3f} "
            f"{r['time_ratio']:10.2f}"
        )
    write_json(args.json, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
