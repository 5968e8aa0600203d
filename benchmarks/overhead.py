"""Target 1 and 2: tfpipe's overhead over `model.fit`, and the cost of micro-batching.

Overhead: `tfpipe` with 1 stage and 1 micro-batch against `model.fit` on the same model,
data and device (two copies of the model, fitted in turn, A B A B ...). Micro-batching: 1 stage
with M micro-batches against M = 1, same batch; and against a hand-written step that runs the
same M micro-batches with one plain `GradientTape` each and sums the gradients ("sequential
accumulation"), which isolates what tfpipe's accumulation adds beyond the smaller products.
All figures are throughput ratios from medians of `--repeats` runs, measured in one process.

Usage:
    python benchmarks/overhead.py [--models mlp,transformer] [--repeats 5] [--steps 30]
        [--micro-batches 2,4,8,16] [--json out/overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,transformer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--micro-batches", default="2,4,8,16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import tensorflow as tf
    from common import compiled, data_for, median, side_by_side

    import tfpipe

    report = {"args": vars(args), "overhead": {}, "micro_batching": {}}
    for name in args.models.split(","):
        batch = args.batch if name == "mlp" else 64
        data = data_for(name, batch, args.steps)
        plain, piped = compiled(name), compiled(name)
        pipe = tfpipe.Pipeline(piped, stages=1, devices=["/cpu:0"])
        fit = dict(epochs=1, steps_per_epoch=args.steps, verbose=0)
        times = side_by_side(
            {
                "model.fit": lambda t: plain.fit(data, callbacks=[t], **fit),
                "tfpipe": lambda t: pipe.fit(data, callbacks=[t], **fit),
            },
            args.repeats,
        )
        ratio = median(times["model.fit"]) / median(times["tfpipe"])
        report["overhead"][name] = {
            "model_fit_ms": 1e3 * median(times["model.fit"]),
            "tfpipe_ms": 1e3 * median(times["tfpipe"]),
            "throughput_ratio": ratio,
        }
        print(
            f"[overhead] {name}: model.fit {1e3 * median(times['model.fit']):.1f} ms/step, "
            f"tfpipe (1 stage, M=1) {1e3 * median(times['tfpipe']):.1f} ms/step, "
            f"throughput ratio {ratio:.3f}"
        )

        runs = {}
        counts = [1] + [int(m) for m in args.micro_batches.split(",")]
        for m in counts:
            model = compiled(name)
            p = tfpipe.Pipeline(model, stages=1, micro_batches=m, devices=["/cpu:0"])
            runs[f"tfpipe M={m}"] = (lambda p: lambda t: p.fit(data, callbacks=[t], **fit))(p)
            if m > 1:
                runs[f"sequential M={m}"] = _sequential(compiled(name), data, m, args.steps, tf)
        times = side_by_side(runs, args.repeats)
        base = median(times["tfpipe M=1"])
        print(
            f"[micro-batching] {name}, batch {batch}: "
            f"{'M':>3} {'ms/step':>8} {'vs M=1':>7} {'seq. ms':>8} {'tfpipe/seq':>10}"
        )
        for m in counts:
            t = median(times[f"tfpipe M={m}"])
            seq = median(times[f"sequential M={m}"]) if m > 1 else t
            report["micro_batching"].setdefault(name, []).append(
                {
                    "M": m,
                    "ms": 1e3 * t,
                    "throughput_vs_M1": base / t,
                    "sequential_ms": 1e3 * seq,
                    "throughput_vs_sequential": seq / t,
                }
            )
            print(f"{'':>30}{m:>3} {1e3 * t:8.1f} {base / t:7.2f} {1e3 * seq:8.1f} {seq / t:10.2f}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def _sequential(model, data, m, steps, tf):
    """A hand-written step: M micro-batches, one tape each, gradients summed, one update."""
    loss_fn = model.loss
    variables = model.trainable_variables
    model.optimizer.build(variables)

    @tf.function(autograph=False)
    def step(x, y):
        xs, ys = tf.split(x, m), tf.split(y, m)
        grads = [tf.zeros_like(v) for v in variables]
        for i in range(m):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(loss_fn(ys[i], model(xs[i], training=True))) / m
            g = tape.gradient(loss, variables)
            grads = [a + tf.convert_to_tensor(b) for a, b in zip(grads, g)]
        model.optimizer.apply_gradients(zip(grads, variables))

    iterator = iter(data)

    def run(timer):
        import time

        x, y = next(iterator)
        step(x, y)  # trace once, then time
        start = time.perf_counter()
        for _ in range(steps - 1):
            x, y = next(iterator)
            step(x, y)
        timer.per_step = (time.perf_counter() - start) / (steps - 1)

    return run


if __name__ == "__main__":
    main()
