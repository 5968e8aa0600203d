"""Allocator peak of one training step per schedule, on a model whose activations dominate.

Runs each schedule on a fresh copy of the same MLP (K stages, M micro-batches, logical CPU
devices), resets TensorFlow's allocator statistics, runs training steps, and reads the
allocator peak (`tf.config.experimental.get_memory_info`). Logical CPU devices share one
allocator, so the figure is the whole pipeline's peak. Also prints the step time, as a ratio
to GPipe measured in the same run.

Usage:
    python benchmarks/schedule_memory.py [--stages 4] [--micro-batches 8] [--batch 4096]
        [--width 256] [--layers 8] [--repeats 3] [--json out/schedule_memory.json]
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
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--schedules", default="gpipe,1f1b,zb-h1")
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

    def make() -> keras.Model:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((args.width,))]
            + [keras.layers.Dense(args.width, activation="relu") for _ in range(args.layers)]
            + [keras.layers.Dense(10)]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.01),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    results = []
    for name in args.schedules.split(","):
        model = make()
        pipe = tfpipe.Pipeline(model, stages=args.stages, micro_batches=args.micro_batches,
                               schedule=name)
        pipe.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)  # trace and warm up
        peaks, times = [], []
        for _ in range(args.repeats):
            tf.config.experimental.reset_memory_stats("CPU:0")
            base = tf.config.experimental.get_memory_info("CPU:0")["current"]
            start = time.perf_counter()
            pipe.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)
            times.append(time.perf_counter() - start)
            peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - base)
        results.append({
            "schedule": name,
            "peak_mib": statistics.median(peaks) / 2**20,
            "step_s": statistics.median(times),
            "predicted_in_flight": list(tfpipe.schedules.peak_in_flight(pipe.schedule)),
        })

    base = results[0]
    print(f"K={args.stages} M={args.micro_batches} batch={args.batch} width={args.width} "
          f"layers={args.layers}, median of {args.repeats}")
    print(f"{'schedule':10} {'peak MiB':>9} {'vs ' + base['schedule']:>10} {'step s':>8} "
          f"{'time ratio':>10}  predicted in-flight per stage")
    for r in results:
        r["peak_ratio"] = r["peak_mib"] / base["peak_mib"]
        r["time_ratio"] = r["step_s"] / base["step_s"]
        print(f"{r['schedule']:10} {r['peak_mib']:9.1f} {r['peak_ratio']:10.2f} {r['step_s']:8.3f} "
              f"{r['time_ratio']:10.2f}  {r['predicted_in_flight']}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
