"""Bytes a pipelined training step moves over loopback, per optimizer, against the least needed.

Starts `tfpipe worker` processes (one stage each) and connects this process as the client,
which holds the data. Per optimizer: a fresh MLP (`--layers` x Dense(`--width`) + Dense(10)),
two stages on two workers, M micro-batches; two warm-up steps (tracing), then `--steps`
steps, reading the loopback interface's received bytes (`/proc/net/dev`, `lo`) before and
after. Everything between the client and the workers crosses loopback, so this counts what
really moved, gRPC framing included, and anything else the machine sends over loopback
meanwhile (run it on an otherwise quiet machine). Beside it, the bytes
`tfpipe.traffic.placed_transfers` finds in the step's placed partition graphs (traced in this
process with the same placement; a collective's own messages are not among them).

`--rank-loops true` runs the step as one loop per worker (`tfpipe.executor.rankloop`),
`--rank-loops steady --schedule 1f1b` its steady phase as one loop over both
(`tfpipe.executor.steadyloop`, the default step for 1F1B); the replicas row is then
skipped: the loops do not run replicas. The placed graphs do not show what the loops send
(the rank loops' crosses inside the calls that read their queues, whose partition graphs the
step's run metadata does not carry; the steady loop's sends are in a loop body, counted once
however many iterations run); loopback does.

Then, with `--replicas R` (default 2; 1 skips it), one more row: Adam, R copies of the
2-stage pipeline on 2R workers, M micro-batches per copy (the batch is R*M micro-batches).

The least a step must move (`least_bytes`), with B the batch, a the boundary activation's
bytes per sample and P the bytes of the trainable weights:

    inputs + labels + 2 * B * a + 2 * (R - 1) * P

the inputs from the client to each copy's stage 0 and the labels to its last stage (the whole
batch, once), each boundary activation forward and its gradient back, and per stage and copy
r > 0 one reduction of its gradients into copy 0 (one gradient per variable) and one read of
its weights (one copy per step). With R = 1 the last term is 0.

Usage:
    python benchmarks/traffic.py [--width 1024] [--layers 8] [--batch 256] [--micro-batches 4]
        [--steps 3] [--optimizers sgd,adam,adamw,clipnorm,global_clipnorm,mixed_float16]
        [--replicas 2] [--rank-loops false|true|steady] [--schedule gpipe|1f1b]
        [--json out/traffic.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if not __package__:  # `python benchmarks/traffic.py`: import its folder as the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.speed_table import write_json
from tfpipe.processes import WorkerPool

OPTIMIZERS = {
    "sgd": ("SGD", {"learning_rate": 0.01}),
    "adam": ("Adam", {}),
    "adamw": ("AdamW", {"weight_decay": 0.01}),
    "clipnorm": ("SGD", {"clipnorm": 1.0}),
    "global_clipnorm": ("Adam", {"global_clipnorm": 1.0}),
    "mixed_float16": ("Adam", {}),  # Keras wraps it in a LossScaleOptimizer
}


def loopback_bytes() -> int:
    """Bytes the loopback interface has received since boot."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[0])
    raise SystemExit("traffic: no loopback interface in /proc/net/dev")


def build(name: str, width: int, layers: int, batch: int) -> tuple[Any, Any, Any]:
    """A compiled MLP for optimizer case `name` (sets the global dtype policy), with a batch.

    Returns:
        The model, inputs `[batch, width]` and integer labels `[batch]`.
    """
    import keras
    import numpy as np

    keras.mixed_precision.set_global_policy(
        "mixed_float16" if name == "mixed_float16" else "float32")
    keras.utils.set_random_seed(0)
    dense = [keras.layers.Dense(width, activation="relu") for _ in range(layers)]
    model = keras.Sequential([keras.Input((width,)), *dense,
                              keras.layers.Dense(10, dtype="float32")])
    cls, kwargs = OPTIMIZERS[name]
    model.compile(getattr(keras.optimizers, cls)(**kwargs),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    return model, rng.normal(size=(batch, width)).astype("float32"), rng.integers(0, 10, size=batch)


def least_bytes(pipe: Any, x: Any, y: Any) -> int:
    """The least one training step of a 2-stage `pipe` (with `pipe.replicas` copies) must move
    between devices: `inputs + labels + 2 * B * a + 2 * (R - 1) * P` (see the module's
    docstring)."""
    import numpy as np

    boundary = pipe.stages[0].model.outputs[0]
    per_sample = int(np.prod(boundary.shape[1:])) * np.dtype(boundary.dtype).itemsize
    weights = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                  for v in pipe.model.trainable_variables)
    return int(x.nbytes + y.nbytes + 2 * len(x) * per_sample + 2 * (pipe.replicas - 1) * weights)


def placed_and_least(pipe: Any, x: Any, y: Any) -> tuple[list[Any], int]:
    """What one step of a 2-stage `pipe` sends between devices by its placed partition graphs
    (`tfpipe.traffic.placed_transfers`), and the least bytes such a step must send
    (`least_bytes`)."""
    import tensorflow as tf

    from tfpipe.traffic import placed_transfers

    with pipe._attached():
        step = tf.function(lambda a, b: pipe.executor.train_step((a, b)), autograph=False)
        sent = placed_transfers(step, tf.constant(x), tf.constant(y))
    return sent, least_bytes(pipe, x, y)


LOOPS: dict[str, bool | str] = {"false": False, "true": True, "steady": "steady"}
"""`--rank-loops`: the unrolled step, the rank loops or the steady loop."""


def measure(name: str, devices: list[str], args: argparse.Namespace,
            replicas: int = 1) -> dict[str, Any]:
    """One optimizer's MiB per step (loopback and placed graphs) and the least needed, for
    `replicas` copies of a 2-stage pipeline on `devices` (2 per copy)."""
    import keras
    import numpy as np

    import tfpipe

    model, x, y = build(name, args.width, args.layers, args.batch)
    pipe = tfpipe.Pipeline(model, stages=2, devices=devices, micro_batches=args.micro_batches,
                           schedule=args.schedule, replicas=replicas,
                           rank_loops=LOOPS[args.rank_loops])
    fit = dict(batch_size=args.batch, epochs=1, verbose=0, shuffle=False)
    pipe.fit(np.concatenate([x, x]), np.concatenate([y, y]), **fit)  # traces; two steps
    before = loopback_bytes()
    pipe.fit(np.concatenate([x] * args.steps), np.concatenate([y] * args.steps), **fit)
    moved = (loopback_bytes() - before) / args.steps
    sent, least = placed_and_least(pipe, x, y)
    placed = sum(t.nbytes or 0 for t in sent)
    keras.mixed_precision.set_global_policy("float32")
    mib = 2.0**20
    return {"optimizer": name, "replicas": replicas, "workers": len(devices),
            "loopback_mib": moved / mib, "placed_mib": placed / mib, "least_mib": least / mib,
            "ratio": moved / least, "placed_ratio": placed / least}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--replicas", type=int, default=2,
                        help="copies of the pipeline in the extra Adam row (1: no such row)")
    parser.add_argument("--rank-loops", default="false", choices=list(LOOPS))
    parser.add_argument("--schedule", default="gpipe", help="gpipe, or 1f1b for the steady loop")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as logs, WorkerPool(Path(logs)) as pool:
        addresses, _ = pool.start(2 * max(args.replicas, 1))
        import tfpipe

        devices = tfpipe.cluster(addresses, threads=1, timeout_s=60)
        results = [measure(name, devices[:2], args) for name in args.optimizers.split(",")]
        if args.replicas > 1 and args.rank_loops == "false":
            results.append(measure("adam", devices, args, replicas=args.replicas))
    print(f"2 stages per copy, one worker each, {args.layers} x Dense({args.width}) + Dense(10), "
          f"batch {args.batch}, M={args.micro_batches} per copy; loopback bytes received per "
          f"step, mean of {args.steps}")
    print(f"{'optimizer':16} {'loopback MiB':>12} {'placed MiB':>10} {'least MiB':>9} "
          f"{'loopback/least':>14} {'placed/least':>12}")
    for r in results:
        label = r["optimizer"] + (f", replicas={r['replicas']}" if r["replicas"] > 1 else "")
        print(f"{label:16} {r['loopback_mib']:12.2f} {r['placed_mib']:10.2f} "
              f"{r['least_mib']:9.2f} {r['ratio']:14.2f} {r['placed_ratio']:12.2f}")
    write_json(args.json, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
