"""First-step cost of a pipelined step: trace time, graph size, first run, against model.fit.

Builds the pipelined training step for K stages and M micro-batches, traces it for the batch's
spec (`trace_s`, and the number of operations in its graph), runs it once (`first_run_s`:
TensorFlow's own graph optimisation and function set-up) and again (`steady_s`), and times
`model.fit`'s first step on the same model and batch (`keras_first_s`, one per model). With
tfpipe's default step for 1F1B, the steady loop (`tfpipe.executor.steadyloop`, `--rank-loops
auto` or `steady`), or the rank loops (`true`), the graph grows with K only; the unrolled
step (`--rank-loops false`) calls each stage's function once per micro-batch
(`tfpipe.executor.stagefn`), so its graph grows by call operations per micro-batch.

It also counts the step graph's function-call operations (`calls`) and the functions in its
library (`functions`): the first run grows with calls x the size of the function each calls,
because TensorFlow builds the callee's body once per call operation while optimising the
step (docs/benchmarks.md, "First-step cost").

Models: `mlp` (8 x Dense(256)), `transformer` (`benchmarks.common.transformer`: the demo's
character Transformer, `--blocks` blocks of width `--width`, sequence 32) or `plain` (the same
with each block written out in plain Keras layers, `benchmarks.common.plain_transformer`),
batch 4 M. `--jit` compiles the model with `jit_compile=True`: `model.fit` compiles its
whole step with XLA, tfpipe each stage's functions on its device.

`--whole-fit` also times the whole first `tfpipe.fit` of a fresh copy on one batch (the
pipeline built, Keras's train function made, the step traced for the batch's static size,
its first run: what a user waits for) against `model.fit`'s (`fit_first_s`), measured
right after `model.fit`'s and before the traced step above.

`--steady-rounds N` then also times the two steps' steady state side by side: a pipeline of
each, fitted in turn N times (A B A B ...) for 4 steps of one batch (the first not timed,
`common.StepTimer`), medians (`steady_side_by_side`).

Usage:
    python -m benchmarks.trace_cost [--model transformer --blocks 12] [--stages 4]
        [--micro-batches 8,32,64] [--rank-loops auto|true|false] [--whole-fit] [--steady-rounds 5]
        [--json out/trace.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if not __package__:  # `python benchmarks/trace_cost.py`: import its folder as the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.speed_table import write_json


def build(args: argparse.Namespace) -> Any:
    """The compiled model, its input spec and a batch of zeros for `batch` samples."""
    import keras
    import tensorflow as tf

    from benchmarks.common import plain_transformer, transformer

    keras.utils.set_random_seed(0)
    if args.model == "mlp":
        model = keras.Sequential(
            [keras.Input((256,))]
            + [keras.layers.Dense(256, activation="relu") for _ in range(8)]
            + [keras.layers.Dense(10)]
        )
        x_spec, y_spec = tf.TensorSpec((None, 256), tf.float32), tf.TensorSpec((None,), tf.int64)
    else:
        make = transformer if args.model == "transformer" else plain_transformer
        model = make(vocab=96, seq_len=32, dim=args.width, blocks=args.blocks)
        x_spec = y_spec = tf.TensorSpec((None, 32), tf.int32)
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True if getattr(args, "jit", False) else "auto")
    return model, (x_spec, y_spec)


def zeros(spec: Any, batch: int) -> Any:
    import tensorflow as tf

    return tf.zeros((batch, *spec.shape[1:]), spec.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=["mlp", "transformer", "plain"])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--micro-batches", default="4,16,64")
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--rank-loops", default="auto",
                        choices=["auto", "true", "false", "steady"],
                        help="the default step (auto: the steady phase as one loop over all "
                        "ranks where it runs, else unrolled), that loop (steady), one loop "
                        "per rank (true) or unrolled (false)")
    parser.add_argument("--whole-fit", action="store_true",
                        help="also time the whole first tfpipe.fit against model.fit's")
    parser.add_argument("--steady-rounds", type=int, default=0,
                        help="also time the loop's (the steady loop's, or with --rank-loops "
                        "true the rank loops') and the unrolled step's steady steps side by "
                        "side, this many fits of each")
    parser.add_argument("--jit", action="store_true",
                        help="compile with XLA: model.fit's whole step, and tfpipe's stages "
                        "(jit_compile='auto' follows the model's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    choice: dict[str, bool | str] = {"auto": "auto", "true": True, "false": False,
                                     "steady": "steady"}
    loops = choice[args.rank_loops]

    import tfpipe

    tfpipe.configure_cpu_devices(args.stages)
    import tensorflow as tf

    _warm_up()
    rows = []
    for m in [int(v) for v in args.micro_batches.split(",")]:
        batch = 4 * m
        model, spec = build(args)
        started = time.perf_counter()
        model.fit(zeros(spec[0], batch), zeros(spec[1], batch), batch_size=batch, verbose=0)
        keras_first = time.perf_counter() - started
        whole = None
        if args.whole_fit:
            model, spec = build(args)
            started = time.perf_counter()
            tfpipe.fit(model, zeros(spec[0], batch), zeros(spec[1], batch), batch_size=batch,
                       verbose=0, stages=args.stages, micro_batches=m, schedule=args.schedule,
                       rank_loops=loops)
            whole = time.perf_counter() - started
            print(f"{args.model} K={args.stages} M={m:3d} {args.schedule} whole first fit: "
                  f"tfpipe.fit {whole:6.2f} s vs model.fit's {keras_first:5.2f} s "
                  f"({whole / keras_first:.2f}x)")
        model, spec = build(args)
        pipe = tfpipe.Pipeline(model, stages=args.stages, micro_batches=m, schedule=args.schedule,
                               rank_loops=loops)
        with pipe._attached():
            started = time.perf_counter()
            step = tf.function(lambda x, y: pipe.executor.train_step((x, y)), autograph=False)
            with pipe.executor.glue_options():  # as `fit` traces and calls the step
                concrete = step.get_concrete_function(*spec)
            trace = time.perf_counter() - started
            x, y = zeros(spec[0], batch), zeros(spec[1], batch)
            with pipe.executor.glue_options():
                first, steady = _timed(lambda: concrete(x, y)), _timed(lambda: concrete(x, y))
        label = _label(pipe.executor.loops)
        # the rank loops' own graph too (their loop and branch bodies are not counted, as the
        # stage functions' bodies are not)
        ops = len(concrete.graph.get_operations()) + (
            pipe.executor.loops.operation_count() if pipe.executor.loops is not None else 0)
        calls = sum(op.type in _CALLS for op in concrete.graph.get_operations())
        functions = len(concrete.graph.as_graph_def().library.function)
        rows.append({"K": args.stages, "M": m, "step": label,
                     "trace_s": trace, "ops": ops, "calls": calls,
                     "functions": functions,
                     "first_run_s": first, "steady_s": steady, "keras_first_s": keras_first,
                     "fit_first_s": whole})
        print(
            f"{args.model} K={args.stages} M={m:3d} {args.schedule} "
            f"{label}: trace {trace:6.2f} s, "
            f"{ops:6d} ops, {calls:5d} calls, {functions:4d} functions, first run {first:6.2f} s, "
            f"steady {steady:5.2f} s; first step "
            f"{trace + first:6.2f} s vs model.fit's {keras_first:5.2f} s "
            f"({(trace + first) / keras_first:.1f}x)"
        )
        if args.steady_rounds:
            looping = "steady" if loops in ("auto", "steady") else True
            steady_s = steady_side_by_side(args, m, args.steady_rounds, looping)
            rows[-1]["steady_side_by_side_s"] = steady_s
            kind = "steady loop" if looping == "steady" else "rank loops"
            loops_s, unrolled_s = steady_s[kind], steady_s["unrolled"]
            print(f"{args.model} K={args.stages} M={m:3d} {args.schedule} steady side by side "
                  f"({args.steady_rounds} fits each): {kind} {loops_s:.3f} s, unrolled "
                  f"{unrolled_s:.3f} s ({loops_s / unrolled_s:.2f}x)")
    write_json(args.json, {"args": vars(args), "rows": rows})


_CALLS = ("PartitionedCall", "StatefulPartitionedCall")
"""The operation types of a call of a function that is not inlined."""


def _warm_up() -> None:
    """One `model.fit` step of a one-layer model: TensorFlow's one-time start-up (thread pools,
    the data pipeline's first use) is then not counted in the first `model.fit` timed."""
    import keras
    import numpy as np

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.fit(np.zeros((8, 4)), np.zeros((8, 1)), batch_size=8, verbose=0)


def _label(loops: Any) -> str:
    """How a pipeline runs its training step."""
    if loops is None:
        return "unrolled"
    return "steady loop" if type(loops).__name__ == "SteadyLoop" else "rank loops"


def steady_side_by_side(args: argparse.Namespace, m: int, rounds: int,
                        looping: bool | str = True) -> dict[str, float]:
    """Median seconds per steady step of the loops (`looping`: True, the rank loops, or
    "steady") and the unrolled step, K = `args.stages`, M = `m`, each pipeline fitted once
    untimed, then `rounds` fits of 4 steps in turn."""
    from statistics import median

    import tfpipe
    from benchmarks.common import side_by_side

    batch = 4 * m
    kind = "steady loop" if looping == "steady" else "rank loops"
    built = {label: (build(args), loops) for label, loops in ((kind, looping),
                                                             ("unrolled", False))}
    # XLA for both with --jit, else for neither (on a GPU machine Keras's "auto" would ask)
    jit = bool(getattr(args, "jit", False))
    pipes = {label: tfpipe.Pipeline(model, stages=args.stages, micro_batches=m,
                                    schedule=args.schedule, rank_loops=loops, jit_compile=jit)
             for label, ((model, _), loops) in built.items()}
    x_spec, y_spec = built["unrolled"][0][1]
    x, y = zeros(x_spec, 4 * batch), zeros(y_spec, 4 * batch)
    for pipe in pipes.values():
        pipe.fit(x[:batch], y[:batch], batch_size=batch, verbose=0)
    runs = {label: (lambda p: lambda timer: p.fit(x, y, batch_size=batch, verbose=0,
                                                  callbacks=[timer]))(pipe)
            for label, pipe in pipes.items()}
    return {label: median(t) for label, t in side_by_side(runs, rounds).items()}


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
