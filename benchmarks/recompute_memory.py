"""Allocator peak and step time of one training step with recompute="never" / "except_last" / "always".

A deep MLP whose activations dominate (`--layers` x Dense(width, relu), a large batch, a
narrow width), K stages on logical CPU devices, M micro-batches, 1F1B by default (with GPipe
every micro-batch's stage inputs stay alive, which recomputation cannot remove). Logical CPU devices share one allocator: the
figure is the whole pipeline's peak. Ratios are to "never", measured in the same run.

Usage:
    python benchmarks/recompute_memory.py [--stages 4] [--micro-batches 8] [--batch 16384]
        [--width 128] [--layers 32] [--schedule 1f1b] [--repeats 3] [--json out/recompute.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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
    import keras
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.width)).astype("float32")
    y = rng.integers(0, 10, size=args.batch)

    results = []
    for mode in ("never", "except_last", "always"):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((args.width,))]
            + [keras.layers.Dense(args.width, activation="relu") for _ in range(args.layers)]
            + [keras.layers.Dense(10)]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.01),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        pipe = tfpipe.Pipeline(model, stages=args.stages, micro_batches=args.micro_batches,
                               schedule=args.schedule, recompute=mode)
        pipe.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)
        peaks, times = [], []
        for _ in range(args.repeats):
            tf.config.experimental.reset_memory_stats("CPU:0")
            base = tf.config.experimental.get_memory_info("CPU:0")["current"]
            start = time.perf_counter()
            pipe.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)
            times.append(time.perf_counter() - start)
            peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - base)
        results.append({"recompute": mode, "peak_mib": statistics.median(peaks) / 2**20,
                        "step_s": statistics.median(times)})

    print(f"K={args.stages} M={args.micro_batches} schedule={args.schedule} batch={args.batch} "
          f"width={args.width} layers={args.layers}, median of {args.repeats}")
    print(f"{'recompute':12} {'peak MiB':>9} {'vs never':>9} {'step s':>8} {'time ratio':>10}")
    for r in results:
        r["peak_ratio"] = r["peak_mib"] / results[0]["peak_mib"]
        r["time_ratio"] = r["step_s"] / results[0]["step_s"]
        print(f"{r['recompute']:12} {r['peak_mib']:9.1f} {r['peak_ratio']:9.2f} {r['step_s']:8.3f} "
              f"{r['time_ratio']:10.2f}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
