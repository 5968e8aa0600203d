"""Target 4: tracing time of the first step and graph size, for K=4 stages and growing M.

Builds the pipelined training step for K stages and M micro-batches and reports the time to
trace it (a concrete function for the batch's spec) and the number of operations in its
graph. Both should grow at most linearly in M (every action is traced once).

Usage:
    python -m benchmarks.trace_cost [--stages 4] [--micro-batches 4,16,64] [--json out/trace.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if not __package__:  # `python benchmarks/trace_cost.py`: import its folder as the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.speed_table import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--micro-batches", default="4,16,64")
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import tfpipe

    tfpipe.configure_cpu_devices(args.stages)
    import keras
    import tensorflow as tf

    rows = []
    for m in [int(v) for v in args.micro_batches.split(",")]:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((256,))]
            + [keras.layers.Dense(256, activation="relu") for _ in range(8)]
            + [keras.layers.Dense(10)]
        )
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        pipe = tfpipe.Pipeline(model, stages=args.stages, micro_batches=m, schedule=args.schedule)
        spec = (tf.TensorSpec((None, 256), tf.float32), tf.TensorSpec((None,), tf.int64))
        with pipe._attached():
            start = time.perf_counter()
            graph = (
                tf.function(lambda x, y: pipe.executor.train_step((x, y)), autograph=False)
                .get_concrete_function(*spec)
                .graph
            )
            seconds = time.perf_counter() - start
        ops = len(graph.get_operations())
        rows.append({"M": m, "trace_s": seconds, "ops": ops, "ops_per_micro_batch": ops / m})
        print(
            f"K={args.stages} M={m:3d} schedule={args.schedule}: trace {seconds:6.2f} s, "
            f"{ops:7d} ops ({ops / m:.0f} per micro-batch)"
        )
    write_json(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
