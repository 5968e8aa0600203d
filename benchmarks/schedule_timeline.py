"""Predicted and measured timelines of one training step, drawn side by side for each schedule.

For each schedule: train a few steps with `profile=True`, read the last step's measured
`(rank, action, start, end)` timeline, estimate per-stage forward/backward costs from it
(medians), simulate the schedule with those costs, and write both PNGs plus the text grid.
On logical CPU devices all stages share one thread pool (as many threads as cores), so the
measured timeline shows each rank following its schedule row with as much overlap between
ranks as the cores allow, not the concurrency of one device per stage.

Usage:
    python -m benchmarks.schedule_timeline [--schedules gpipe,1f1b] [--stages 4]
        [--micro-batches 8] [--out docs/img]
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", default="gpipe,1f1b")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--out", default="docs/img")
    args = parser.parse_args()

    import tfpipe

    tfpipe.configure_cpu_devices(args.stages)
    import keras
    import numpy as np

    from tfpipe.schedules import Costs, format_schedule, plot, simulate

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.width)).astype("float32")
    y = rng.integers(0, 10, size=args.batch)
    os.makedirs(args.out, exist_ok=True)
    for name in args.schedules.split(","):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((args.width,))]
            + [keras.layers.Dense(args.width, activation="relu") for _ in range(2 * args.stages)]
            + [keras.layers.Dense(10)]
        )
        model.compile(
            optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        pipe = tfpipe.Pipeline(
            model, stages=args.stages, micro_batches=args.micro_batches, schedule=name, profile=True
        )
        pipe.fit(x, y, batch_size=args.batch, epochs=3, verbose=0)
        measured = pipe.timeline()
        costs = {}
        for kind in "FBIW":
            per_stage = []
            for s in range(len(pipe.stages)):
                spans = [t1 - t0 for _, a, t0, t1 in measured if a.kind == kind and a.stage == s]
                per_stage.append(statistics.median(spans) if spans else 0.0)
            costs[kind] = per_stage
        predicted = simulate(
            pipe.schedule,
            Costs(
                forward=costs["F"],
                backward=costs["B"] if any(costs["B"]) else 1.0,
                input_grad=costs["I"] if any(costs["I"]) else None,
                weight_grad=costs["W"] if any(costs["W"]) else None,
            ),
        )
        step = max(t1 for *_, t1 in measured)
        plot(
            measured,
            os.path.join(args.out, f"{name}_measured.png"),
            title=f"{name}: measured step, {step:.1f} ms (K={args.stages}, M={args.micro_batches})",
        )
        plot(
            predicted,
            os.path.join(args.out, f"{name}_predicted.png"),
            title=f"{name}: predicted from measured costs, {predicted.step_time:.1f} ms, "
            f"bubble {predicted.bubble_fraction:.2f}",
        )
        print(
            f"== {name}: measured step {step:.1f} ms, predicted {predicted.step_time:.1f} ms, "
            f"predicted bubble {predicted.bubble_fraction:.2f}"
        )
        print(format_schedule(pipe.schedule))


if __name__ == "__main__":
    main()
