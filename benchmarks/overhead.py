"""Target 1 and 2: tfpipe's overhead over `model.fit`, and the cost of micro-batching.

Overhead: `tfpipe` with 1 stage and 1 micro-batch against `model.fit` on the same model,
data and device (two copies of the model, fitted in turn, A B A B ...). Micro-batching: 1 stage
with M micro-batches against M = 1, same batch; and against a hand-written step that runs the
same M micro-batches with one plain `GradientTape` each and sums the gradients ("sequential
accumulation"), which isolates what tfpipe's accumulation adds beyond the smaller products.
All figures are throughput ratios from medians of `--repeats` runs, measured in one process.

`--jit` measures per-stage XLA instead (`measure_jit`), on 4 logical CPU devices: 1 stage
with `jit_compile=True` against `model.fit(jit_compile=True)` (and both without XLA), and 4
stages with XLA against without, all fitted in turn in one process.

`measure_overhead`, `measure_micro_batching` and `measure_jit` are also used by
`benchmarks/gpu.py`, which runs them on logical GPUs.

Usage:
    python -m benchmarks.overhead [--models mlp,transformer] [--repeats 5] [--steps 30]
        [--micro-batches 2,4,8,16] [--json out/overhead.json]
    python -m benchmarks.overhead --jit [--models mlp,transformer] [--repeats 5] [--steps 20]
        [--jit-micro-batches 4]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if not __package__:  # `python benchmarks/overhead.py`: import its folder as the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.speed_table import median, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,transformer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--micro-batches", default="2,4,8,16")
    parser.add_argument("--json", default=None)
    parser.add_argument("--jit", action="store_true",
                        help="per-stage XLA: 1 stage vs model.fit, 4 stages with vs without")
    parser.add_argument("--jit-micro-batches", type=int, default=4)
    args = parser.parse_args()
    if args.jit:
        import tfpipe

        devices = tfpipe.configure_cpu_devices(4)
        report_jit: dict[str, Any] = {"args": vars(args), "jit": {}}
        for name in args.models.split(","):
            batch = args.batch if name == "mlp" else 64
            r = measure_jit(name, batch, args.steps, args.repeats, devices, args.jit_micro_batches)
            report_jit["jit"][name] = r
            print(jit_table(name, r))
        write_json(args.json, report_jit)
        return

    report: dict[str, Any] = {"args": vars(args), "overhead": {}, "micro_batching": {}}
    counts = [int(m) for m in args.micro_batches.split(",")]
    for name in args.models.split(","):
        batch = args.batch if name == "mlp" else 64
        result = measure_overhead(name, batch, args.steps, args.repeats)
        report["overhead"][name] = result
        print(
            f"[overhead] {name}: model.fit {result['model_fit_ms']:.1f} ms/step, "
            f"tfpipe (1 stage, M=1) {result['tfpipe_ms']:.1f} ms/step, "
            f"throughput ratio {result['throughput_ratio']:.3f}"
        )
        rows = measure_micro_batching(name, batch, counts, args.steps, args.repeats)
        report["micro_batching"][name] = rows
        print(micro_batching_table(name, batch, rows))
    write_json(args.json, report)


def measure_overhead(
    name: str,
    batch: int,
    steps: int,
    repeats: int,
    device: str = "/cpu:0",
    no_xla_baseline: bool = False,
) -> dict[str, Any]:
    """Target 1: `model.fit` against tfpipe with 1 stage and M = 1 on `device`, in turn.

    Args:
        name: `"mlp"` or `"transformer"` (see `common.compiled`).
        batch: the global batch.
        steps: steps per timed fit (the first one, which traces, is not timed).
        repeats: fits of each configuration; medians are reported.
        device: the device of the tfpipe stage; `model.fit` runs on the default device, which
            must be the same one (the first GPU, or CPU:0 without GPUs).
        no_xla_baseline: also time `model.fit` with `jit_compile=False`. On a GPU Keras's
            default `jit_compile="auto"` compiles `model.fit`'s step with XLA, and tfpipe's
            `"auto"` then compiles each stage's forward and backward (not the whole step:
            one XLA program cannot span devices); this isolates what XLA gives `model.fit`.

    Returns:
        `model_fit_ms`, `tfpipe_ms`, `throughput_ratio` (model.fit time / tfpipe time), the
        resolved `model_fit_jit_compile`, and with `no_xla_baseline` also `model_fit_no_xla_ms`
        and `throughput_ratio_vs_no_xla`.
    """
    import tfpipe
    from benchmarks.common import compiled, data_for, side_by_side

    data = data_for(name, batch, steps)
    plain, piped = compiled(name), compiled(name)
    pipe = tfpipe.Pipeline(piped, stages=1, devices=[device])
    fit: dict[str, Any] = dict(epochs=1, steps_per_epoch=steps, verbose=0)
    runs: dict[str, Callable[[Any], None]] = {
        "model.fit": lambda t: plain.fit(data, callbacks=[t], **fit),
        "tfpipe": lambda t: pipe.fit(data, callbacks=[t], **fit),
    }
    if no_xla_baseline:
        no_xla = compiled(name)
        no_xla.jit_compile = False
        runs["model.fit no XLA"] = lambda t: no_xla.fit(data, callbacks=[t], **fit)
    times = side_by_side(runs, repeats)
    result: dict[str, Any] = {
        "model_fit_ms": 1e3 * median(times["model.fit"]),
        "tfpipe_ms": 1e3 * median(times["tfpipe"]),
        "throughput_ratio": median(times["model.fit"]) / median(times["tfpipe"]),
        "model_fit_jit_compile": bool(plain.jit_compile),
    }
    if no_xla_baseline:
        result["model_fit_no_xla_ms"] = 1e3 * median(times["model.fit no XLA"])
        result["throughput_ratio_vs_no_xla"] = median(times["model.fit no XLA"]) / median(
            times["tfpipe"]
        )
    return result


def measure_jit(
    name: str,
    batch: int,
    steps: int,
    repeats: int,
    devices: list[str],
    micro_batches: int = 4,
) -> dict[str, Any]:
    """Per-stage XLA: `model.fit` and 1-stage tfpipe, each with and without XLA, on
    `devices[0]`; K = `len(devices)` stages with XLA and without; all fitted in turn.

    Args:
        name: `"mlp"` or `"transformer"` (see `common.compiled`).
        batch: the global batch.
        steps: steps per timed fit (the first one, which traces and compiles, is not timed).
        repeats: fits of each configuration; medians are reported.
        devices: the stages' devices; `model.fit` runs on the default device, which must be
            `devices[0]` (the first GPU, or CPU:0).
        micro_batches: M of the K-stage pipelines (the 1-stage ones run M = 1).

    Returns:
        `ms` (median ms per step of each configuration), `stages` (K), `micro_batches`, and
        throughput ratios: `one_stage_xla_vs_model_fit_xla` (the 0.97 target),
        `one_stage_vs_model_fit_no_xla`, `k_stages_xla_vs_no_xla` and
        `model_fit_xla_vs_no_xla` (above 1: faster with XLA).
    """
    import tfpipe
    from benchmarks.common import compiled, data_for, side_by_side

    data = data_for(name, batch, steps)
    fit: dict[str, Any] = dict(epochs=1, steps_per_epoch=steps, verbose=0)
    plain = {jit: compiled(name) for jit in (True, False)}
    for jit, model in plain.items():
        model.jit_compile = jit
    k = len(devices)
    pipes = {
        (1, jit): tfpipe.Pipeline(compiled(name), stages=1, devices=devices[:1], jit_compile=jit)
        for jit in (True, False)
    }
    pipes.update({
        (k, jit): tfpipe.Pipeline(compiled(name), stages=k, micro_batches=micro_batches,
                                  devices=devices, jit_compile=jit)
        for jit in (True, False)
    })
    runs: dict[str, Callable[[Any], None]] = {}
    for jit, model in plain.items():
        runs[f"model.fit xla={jit}"] = (
            lambda m: lambda t: m.fit(data, callbacks=[t], **fit)
        )(model)
    for (stages, jit), pipe in pipes.items():
        runs[f"tfpipe K={stages} xla={jit}"] = (
            lambda p: lambda t: p.fit(data, callbacks=[t], **fit)
        )(pipe)
    times = {label: median(t) for label, t in side_by_side(runs, repeats).items()}
    ms = {label: 1e3 * t for label, t in times.items()}
    fit_on, fit_off = times["model.fit xla=True"], times["model.fit xla=False"]
    return {
        "stages": k,
        "micro_batches": micro_batches,
        "ms": ms,
        "one_stage_xla_vs_model_fit_xla": fit_on / times["tfpipe K=1 xla=True"],
        "one_stage_vs_model_fit_no_xla": fit_off / times["tfpipe K=1 xla=False"],
        "k_stages_xla_vs_no_xla": times[f"tfpipe K={k} xla=False"]
        / times[f"tfpipe K={k} xla=True"],
        "model_fit_xla_vs_no_xla": fit_off / fit_on,
    }


def jit_table(name: str, r: dict[str, Any]) -> str:
    """The `[jit]` lines printed by `main --jit` (and by `benchmarks/gpu.py`)."""
    lines = [f"[jit] {name}: ms/step " + ", ".join(f"{k} {v:.1f}" for k, v in r["ms"].items())]
    lines.append(
        f"[jit] {name}: throughput ratios: 1 stage XLA / model.fit XLA "
        f"{r['one_stage_xla_vs_model_fit_xla']:.3f} (target >= 0.97); 1 stage / model.fit, "
        f"both without XLA {r['one_stage_vs_model_fit_no_xla']:.3f}; K={r['stages']} "
        f"M={r['micro_batches']} XLA / no XLA {r['k_stages_xla_vs_no_xla']:.3f}; model.fit "
        f"XLA / no XLA {r['model_fit_xla_vs_no_xla']:.3f}"
    )
    return "\n".join(lines)


def measure_micro_batching(
    name: str, batch: int, counts: list[int], steps: int, repeats: int, device: str = "/cpu:0"
) -> list[dict[str, float]]:
    """Target 2: tfpipe with 1 stage and M micro-batches against M = 1 (and against
    sequential accumulation of the same M), on `device`, fitted in turn.

    Args:
        counts: the M values besides 1, for example `[2, 4, 8, 16]`.

    Returns:
        One row per M (M = 1 first): `M`, `ms`, `throughput_vs_M1`, `sequential_ms`,
        `throughput_vs_sequential`.
    """
    import tensorflow as tf

    import tfpipe
    from benchmarks.common import compiled, data_for, side_by_side

    data = data_for(name, batch, steps)
    fit: dict[str, Any] = dict(epochs=1, steps_per_epoch=steps, verbose=0)
    runs: dict[str, Callable[[Any], None]] = {}
    ms = [1] + [m for m in counts if m != 1]
    for m in ms:
        p = tfpipe.Pipeline(compiled(name), stages=1, micro_batches=m, devices=[device])
        runs[f"tfpipe M={m}"] = (lambda p: lambda t: p.fit(data, callbacks=[t], **fit))(p)
        if m > 1:
            runs[f"sequential M={m}"] = _sequential(compiled(name), data, m, steps, tf)
    times = side_by_side(runs, repeats)
    base = median(times["tfpipe M=1"])
    rows = []
    for m in ms:
        t = median(times[f"tfpipe M={m}"])
        seq = median(times[f"sequential M={m}"]) if m > 1 else t
        rows.append(
            {
                "M": m,
                "ms": 1e3 * t,
                "throughput_vs_M1": base / t,
                "sequential_ms": 1e3 * seq,
                "throughput_vs_sequential": seq / t,
            }
        )
    return rows


def micro_batching_table(name: str, batch: int, rows: list[dict[str, float]]) -> str:
    """The `[micro-batching]` table printed by `main` (and by `benchmarks/gpu.py`)."""
    lines = [
        f"[micro-batching] {name}, batch {batch}: "
        f"{'M':>3} {'ms/step':>8} {'vs M=1':>7} {'seq. ms':>8} {'tfpipe/seq':>10}"
    ]
    for r in rows:
        lines.append(
            f"{'':>30}{int(r['M']):>3} {r['ms']:8.1f} {r['throughput_vs_M1']:7.2f} "
            f"{r['sequential_ms']:8.1f} {r['throughput_vs_sequential']:10.2f}"
        )
    return "\n".join(lines)


def _sequential(model: Any, data: Any, m: int, steps: int, tf: Any) -> Callable[[Any], None]:
    """A hand-written step: M micro-batches, one tape each, gradients summed, one update."""
    loss_fn = model.loss
    variables = model.trainable_variables
    model.optimizer.build(variables)

    @tf.function(autograph=False)
    def step(x: Any, y: Any) -> None:
        xs, ys = tf.split(x, m), tf.split(y, m)
        grads = [tf.zeros_like(v) for v in variables]
        for i in range(m):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(loss_fn(ys[i], model(xs[i], training=True))) / m
            g = tape.gradient(loss, variables)
            grads = [a + tf.convert_to_tensor(b) for a, b in zip(grads, g)]
        model.optimizer.apply_gradients(zip(grads, variables))

    iterator = iter(data)

    def run(timer: Any) -> None:
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
