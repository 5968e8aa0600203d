"""One prepared GPU run: targets 1 and 2, per-logical-GPU memory peaks, and the memory promise.

Splits one physical GPU (an H100 or H200) into `--logical` logical GPUs of
`--memory-limit-gib` each (`tf.config.set_logical_device_configuration`, before TensorFlow
initialises) and measures, each part in its own process with a time limit:

- `warmup`: the first use of the GPU, timed: TensorFlow's pip wheels carry no sm_90 code, so
  on an H100 / H200 the driver JIT-compiles the kernels from PTX (`gpu.sh` enlarges the JIT
  cache so that the later parts reuse them).
- `speed`: target 1 (tfpipe 1 stage, M = 1 against `model.fit`, both with Keras's default
  `jit_compile="auto"`, which is XLA on a GPU; `model.fit` with `jit_compile=False` is timed
  too) and target 2 (1 stage, M micro-batches against M = 1, and against sequential
  accumulation), on one logical GPU; then per-stage XLA on and off (`measure_jit`: 1 stage
  and `model.fit`, each with and without XLA, and K = `--logical` stages with and without),
  through `benchmarks/overhead.py`; then the steady loop (`rank_loops="steady"`) against the
  unrolled step, 1F1B over all logical GPUs, side by side (`steady_loop`).
- `memory`: allocator peak of one training step on each logical GPU
  (`tfpipe.allocator.peak_bytes("GPU:i")` after `tfpipe.allocator.reset`) for
  GPipe / 1F1B with recompute never, and 1F1B with except_last and always; K = `--logical`.
- `promise_plain`, `promise_pipeline`: the memory promise. An MLP sized so that its weights and
  Adam state (3 x the weights) exceed one logical GPU: plain `model.fit` on one logical GPU is
  expected to raise `ResourceExhaustedError` (caught and recorded), and `tfpipe.fit` of the
  model built in `tfpipe.build_scope()` (its weights made only on their stage's GPU) with one
  stage per logical GPU (1F1B) to train (losses and per-GPU peaks recorded).

Each part writes its results as it goes, so a part stopped at its time limit still reports
what it finished. Prints tables, then writes one JSON file: `--json`, else `$OUT/gpu.json`
when `$OUT` is set, else `benchmarks/results/gpu.json`. Exits non-zero if a part failed.

`--cpu-smoke` runs the same code paths on logical CPU devices with tiny sizes and no memory
limit (logical CPUs share one allocator, so every "per-device" peak there is the whole
process's, and nothing runs out of memory); it checks the script, not the hardware.

Usage:
    bash benchmarks/gpu.sh                      # installs if needed, then runs this
    python -m benchmarks.gpu [--logical 4] [--memory-limit-gib 4] [--budget-s 420]
        [--parts warmup,promise_plain,promise_pipeline,memory,speed] [--json PATH]
        [--cpu-smoke]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
if not __package__:  # `python benchmarks/gpu.py` (gpu.sh): import its folder as the package
    sys.path[0] = str(HERE.parent)

PARTS = ("warmup", "promise_plain", "promise_pipeline", "memory", "traffic", "speed")
# Seconds each part may take at most (the overall --budget-s caps them further); `speed` goes
# last and gets whatever is left.
CAPS = {"warmup": 240, "promise_plain": 90, "promise_pipeline": 120, "memory": 120,
        "traffic": 90, "speed": 300}
STARTED = time.perf_counter()
MEMORY_CONFIGS = (("gpipe", "never"), ("1f1b", "never"), ("1f1b", "except_last"),
                  ("1f1b", "always"))
MiB = 2**20

# Sizes on a GPU and in the CPU smoke run: (gpu, smoke).
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "models": ("mlp,transformer", "mlp"),
    "micro_batches": ("2,4,8,16", "2"),
    "steps": (60, 3),
    "repeats": (5, 1),
    "mem_width": (1024, 128),
    "mem_layers": (16, 4),
    "mem_batch": (16384, 4096),
    "mem_micro_batches": (8, 8),
    "mem_repeats": (3, 1),
    "promise_layers": (8, 8),
    "promise_width": (0, 256),  # 0: sized from --memory-limit-gib (promise_width)
    "promise_batch": (512, 64),
    "promise_micro_batches": (4, 4),
    "promise_steps": (4, 2),
    "promise_epochs": (3, 2),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="same code paths on logical CPUs, tiny sizes, no memory limit")
    parser.add_argument("--logical", type=int, default=4, help="logical devices (2-4)")
    parser.add_argument("--memory-limit-gib", type=float, default=4.0,
                        help="memory of each logical GPU, GiB (X)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall-clock seconds for all parts together")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--json", default=None)
    parser.add_argument("--promise-lr", type=float, default=1e-4)
    for key in DEFAULTS:
        kind = str if isinstance(DEFAULTS[key][0], str) else int
        parser.add_argument("--" + key.replace("_", "-"), type=kind, default=None)
    # internal: run one part in this process and write its results there
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--part-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, (gpu, smoke) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.cpu_smoke else gpu)
    if not 1 <= args.logical <= 8:
        parser.error("--logical must be between 1 and 8")
    return args


# --------------------------------------------------------------------------------------------
# The orchestrator: one process per part, each with a time limit.


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.part:
        return run_part(args)
    deadline = time.monotonic() + args.budget_s
    report: dict[str, Any] = {
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "card": nvidia_smi(),
        "args": {k: v for k, v in vars(args).items() if k not in ("part", "part_json")},
        "parts": {},
        "env": {},
        "warmup": {},
        "overhead": {},
        "micro_batching": {},
        "jit": {},
        "steady_loop": {},
        "memory": {},
        "traffic": {},
        "replicas": {},
        "promise": {},
    }
    print(f"[gpu] mode {report['mode']}, card {report['card'] or 'none (nvidia-smi absent)'}, "
          f"{args.logical} logical devices"
          + ("" if args.cpu_smoke else f" of {args.memory_limit_gib:g} GiB"), flush=True)
    scratch = Path(json_path(args)).with_suffix(".parts")
    scratch.mkdir(parents=True, exist_ok=True)
    ok = True
    for name in [p for p in PARTS if p in args.parts.split(",")]:
        left = deadline - time.monotonic()
        if left < 20:
            report["parts"][name] = {"status": "skipped", "reason": f"{left:.0f} s of budget left"}
            print(f"[gpu] {name}: skipped, budget spent", flush=True)
            ok = False
            continue
        status = run_child(name, argv, scratch / f"{name}.json", min(CAPS[name], left))
        report["parts"][name] = {k: v for k, v in status.items() if k != "results"}
        results = status.get("results", {})
        report["env"] = report["env"] or results.pop("env", {})
        results.pop("env", None)
        report["parts"][name].update(results.pop("timing", {}))
        for key, value in results.items():
            report[key].update(value)
        ok = ok and status["status"] == "ok"
    print(summary(report), flush=True)
    path = json_path(args)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"[gpu] wrote {path}", flush=True)
    return 0 if ok else 1


def json_path(args: argparse.Namespace) -> str:
    if args.json:
        return str(args.json)
    if os.environ.get("OUT"):
        return os.path.join(os.environ["OUT"], "gpu.json")
    return str(HERE / "results" / "gpu.json")


def nvidia_smi() -> str | None:
    """The card's name, memory and driver from `nvidia-smi`, or None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().replace("\n", "; ") or None


def run_child(name: str, argv: list[str], out: Path, timeout: float) -> dict[str, Any]:
    """Runs part `name` in a fresh process (fresh TensorFlow, fresh allocators)."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--part", name,
           "--part-json", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    status: dict[str, Any]
    print(f"[gpu] {name}: running (limit {timeout:.0f} s)", flush=True)
    try:  # the part's tables go straight to our output; its log is kept for failures
        proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, timeout=timeout, env=env)
        stderr = proc.stderr
        status = {"status": "ok" if proc.returncode == 0 else "failed", "rc": proc.returncode}
    except subprocess.TimeoutExpired as err:
        stderr = _text(err.stderr)
        status = {"status": "timeout", "rc": None}
    status["seconds"] = round(time.monotonic() - start, 1)
    if status["status"] != "ok":
        tail = stderr.strip()[-3000:]
        status["stderr_tail"] = tail
        print(f"[gpu] {name}: {status['status']} after {status['seconds']} s\n{tail}", flush=True)
    if out.exists():
        status["results"] = json.loads(out.read_text())
    return status


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def summary(report: dict[str, Any]) -> str:
    lines = ["[gpu] summary"]
    for name, part in report["parts"].items():
        start = part.get("startup_s")
        lines.append(f"  {name:18} {part['status']:8} {part.get('seconds', 0):7.1f} s"
                     + (f" (TensorFlow and devices ready after {start} s)" if start else ""))
    for name, r in report["overhead"].items():
        extra = (f", vs model.fit without XLA {r['throughput_ratio_vs_no_xla']:.3f}"
                 if "throughput_ratio_vs_no_xla" in r else "")
        lines.append(f"  target 1 {name}: throughput ratio {r['throughput_ratio']:.3f}"
                     f" (model.fit jit_compile={r['model_fit_jit_compile']}){extra}")
    for name, r in report["jit"].items():
        lines.append(f"  XLA {name}: 1 stage / model.fit, both XLA "
                     f"{r['one_stage_xla_vs_model_fit_xla']:.3f}; K={r['stages']} XLA / no XLA "
                     f"{r['k_stages_xla_vs_no_xla']:.3f}")
    for name, rows in report["micro_batching"].items():
        cells = ", ".join(f"M={r['M']} {r['throughput_vs_M1']:.2f}" for r in rows)
        lines.append(f"  target 2 {name}: throughput vs M=1: {cells}")
    if report["traffic"]:
        cells = ", ".join(f"{name} {r['placed_ratio']:.2f}"
                          for name, r in report["traffic"].items())
        lines.append(f"  bytes between devices / least needed: {cells}")
    two, four = report["replicas"].get("replicas=2"), report["replicas"].get("replicas=4")
    if two:
        lines.append(f"  replicas=2 x 2 stages: bytes / least {two['placed_ratio']:.2f}")
    if four:
        lines.append(f"  replicas=4 x 1 stage: collectives {four['communication_hint']}, "
                     f"{four['status']}")
    plain, piped = report["promise"].get("plain"), report["promise"].get("pipeline")
    if plain:
        lines.append(f"  promise: plain model.fit on one logical device: {plain['status']}")
    if piped:
        lines.append(f"  promise: tfpipe on {piped.get('stages')} logical devices: "
                     f"{piped['status']}, losses {piped.get('losses')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# One part, in its own process.


class Results:
    """A part's results, rewritten to its JSON file after every addition."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def put(self, section: str, key: str, value: Any) -> None:
        self.data.setdefault(section, {})[key] = value
        if self.path:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=2)
            os.replace(tmp, self.path)


def run_part(args: argparse.Namespace) -> int:
    results = Results(args.part_json)
    devices, mem_names, env = setup_devices(args)
    results.put("env", "devices", devices)
    for key, value in env.items():
        results.put("env", key, value)
    import tensorflow as tf

    with tf.device(devices[0]):
        float(tf.reduce_sum(tf.ones((4, 4))))
    results.put("timing", "startup_s", round(time.perf_counter() - STARTED, 1))
    part: Callable[[argparse.Namespace, list[str], list[str], Results], None] = {
        "warmup": part_warmup,
        "speed": part_speed,
        "memory": part_memory,
        "traffic": part_traffic,
        "promise_plain": part_promise_plain,
        "promise_pipeline": part_promise_pipeline,
    }[args.part]
    try:
        part(args, devices, mem_names, results)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def setup_devices(args: argparse.Namespace) -> tuple[list[str], list[str], dict[str, Any]]:
    """Creates the logical devices before TensorFlow initialises.

    Returns:
        The logical devices' names, the names `get_memory_info` takes (`GPU:0`, ...), and
        facts about the environment for the report.
    """
    import keras
    import tensorflow as tf

    import tfpipe

    env: dict[str, Any] = {
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "python": platform.python_version(),
    }
    if args.cpu_smoke:
        names = tfpipe.configure_cpu_devices(args.logical)
        env["device_name"] = "logical CPU devices (smoke run, no memory limit)"
        return names, [f"CPU:{i}" for i in range(len(names))], env
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        raise SystemExit(
            "TensorFlow sees no GPU (tf.config.list_physical_devices('GPU') is empty): install "
            "TensorFlow with its CUDA libraries (pip install 'tensorflow[and-cuda]'), or run "
            "with --cpu-smoke to check the script on logical CPU devices."
        )
    tf.config.set_visible_devices(gpus[0], "GPU")
    limit = int(args.memory_limit_gib * 1024)
    tf.config.set_logical_device_configuration(
        gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=limit)] * args.logical
    )
    details = tf.config.experimental.get_device_details(gpus[0])
    env.update(
        device_name=details.get("device_name"),
        compute_capability=details.get("compute_capability"),
        physical_gpus=len(gpus),
        memory_limit_mib=limit,
        cuda=tf.sysconfig.get_build_info().get("cuda_version"),
        cudnn=tf.sysconfig.get_build_info().get("cudnn_version"),
    )
    names = [d.name for d in tf.config.list_logical_devices("GPU")]
    return names, [f"GPU:{i}" for i in range(len(names))], env


def part_warmup(args: argparse.Namespace, devices: list[str], mem: list[str],
                results: Results) -> None:
    """Runs each kind of step once (plain fits of both models, a 4-stage 1F1B fit with
    recomputation), so that kernel compilation is paid, and timed, here."""
    import tfpipe
    from benchmarks.common import compiled, data_for, deep_mlp, wide_data

    for name in args.models.split(","):
        start = time.perf_counter()
        batch = 256 if name == "mlp" else 64
        compiled(name).fit(data_for(name, batch, 2), steps_per_epoch=2, epochs=1, verbose=0)
        results.put("warmup", f"model.fit {name} s", round(time.perf_counter() - start, 1))
    start = time.perf_counter()
    x, y = wide_data(256, 128)
    pipe = tfpipe.Pipeline(deep_mlp(128, 8), stages=len(devices), micro_batches=4,
                           schedule="1f1b", recompute="except_last", devices=devices)
    pipe.fit(x, y, batch_size=64, epochs=1, verbose=0)
    results.put("warmup", "tfpipe 1f1b s", round(time.perf_counter() - start, 1))
    print(f"[warmup] seconds: {results.data['warmup']}", flush=True)


def part_speed(args: argparse.Namespace, devices: list[str], mem: list[str],
               results: Results) -> None:
    """Targets 1 and 2 on the first logical device (where `model.fit` runs by default), then
    per-stage XLA on and off (`measure_jit`, K = all logical devices), then the steady loop
    against the unrolled step (`steady_loop`)."""
    from benchmarks.overhead import (
        jit_table,
        measure_jit,
        measure_micro_batching,
        measure_overhead,
        micro_batching_table,
    )

    counts = [int(m) for m in args.micro_batches.split(",")]
    for name in args.models.split(","):
        batch = 256 if name == "mlp" else 64
        r = measure_overhead(name, batch, args.steps, args.repeats, device=devices[0],
                             no_xla_baseline=True)
        r["batch"] = batch
        results.put("overhead", name, r)
        print(f"[overhead] {name} on {devices[0]}: model.fit {r['model_fit_ms']:.2f} ms/step "
              f"(jit_compile={r['model_fit_jit_compile']}), without XLA "
              f"{r['model_fit_no_xla_ms']:.2f}, tfpipe (1 stage, M=1) {r['tfpipe_ms']:.2f}; "
              f"throughput ratio {r['throughput_ratio']:.3f}, vs no XLA "
              f"{r['throughput_ratio_vs_no_xla']:.3f}", flush=True)
        rows = measure_micro_batching(name, batch, counts, args.steps, args.repeats,
                                      device=devices[0])
        results.put("micro_batching", name, rows)
        print(micro_batching_table(name, batch, rows), flush=True)
    for name in args.models.split(","):
        batch = 256 if name == "mlp" else 64
        r = measure_jit(name, batch, args.steps, args.repeats, devices)
        results.put("jit", name, r)
        print(jit_table(name, r), flush=True)
    steady_loop(args, devices, results)


def steady_loop(args: argparse.Namespace, devices: list[str], results: Results) -> None:
    """The steady loop (`rank_loops="steady"`) against the unrolled step, 1F1B over all
    logical devices, side by side under `fit` (issue #21: whether it can be the default)."""
    from benchmarks.trace_cost import steady_side_by_side

    smoke = args.cpu_smoke
    model = argparse.Namespace(model="transformer", blocks=2 if smoke else 4,
                               width=16 if smoke else 64, stages=len(devices), schedule="1f1b")
    m = 2 * len(devices)
    got = steady_side_by_side(model, m, 1 if smoke else 3, "steady")
    ratio = got["steady loop"] / got["unrolled"]
    results.put("steady_loop", "transformer", {"K": len(devices), "M": m, "s_per_step": got,
                                               "steady_vs_unrolled": ratio})
    print(f"[steady loop] transformer ({model.blocks} blocks) K={len(devices)} M={m} 1f1b: "
          f"steady loop {got['steady loop'] * 1000:.1f} ms/step, unrolled "
          f"{got['unrolled'] * 1000:.1f} ({ratio:.3f}x)", flush=True)


def step_peaks(fit_once: Callable[[], Any], mem: list[str], repeats: int) -> dict[str, Any]:
    """`benchmarks.common.step_peaks`, its MiB rounded to 0.1."""
    from benchmarks.common import step_peaks

    out = step_peaks(fit_once, mem, repeats)
    for key in ("peak_above_rest_mib", "peak_mib", "rest_mib"):
        out[key] = [None if v is None else round(v, 1) for v in out[key]]
    return out


def part_traffic(args: argparse.Namespace, devices: list[str], mem: list[str],
                 results: Results) -> None:
    """Bytes one training step sends between devices, per optimizer, against the least needed
    (`benchmarks/traffic.py`'s model and count, read from the step's placed partition graphs):
    two stages on the last two logical devices, so that the first (the default device, where
    Keras's optimizer math landed before it followed its variables) should see only scalars;
    also the bytes other than the batch's own (which come from the host: CPU:0 in the CPU
    smoke run) that touched the default device."""
    import keras

    import tfpipe
    from benchmarks.traffic import OPTIMIZERS, build, placed_and_least
    from tfpipe.devices import canonical
    from tfpipe.traffic import kind_of

    width, batch = (1024, 256) if not args.cpu_smoke else (128, 64)
    stage_devices = devices[-2:]
    for name in OPTIMIZERS:
        model, x, y = build(name, width, 8 if not args.cpu_smoke else 2, batch)
        pipe = tfpipe.Pipeline(model, stages=2, devices=stage_devices, micro_batches=4)
        sent, least = placed_and_least(pipe, x, y)
        keras.mixed_precision.set_global_policy("float32")
        placed = sum(t.nbytes or 0 for t in sent)
        first = canonical(devices[0])
        default = sum(t.nbytes or 0 for t in sent if first in (t.source, t.target)
                      and kind_of(t) not in ("inputs", "labels", "sample_weights"))
        results.put("traffic", name, {"placed_mib": placed / MiB, "least_mib": least / MiB,
                                      "placed_ratio": placed / least,
                                      "default_device_bytes": default,
                                      "stage_devices": stage_devices})
        print(f"[traffic] {name}: {placed / MiB:.2f} MiB per step, least {least / MiB:.2f} "
              f"({placed / least:.2f}x); {default} B (not the batch) to or from {devices[0]}",
              flush=True)
    if len(devices) >= 4:
        traffic_replicas(args, devices[:4], results)


def traffic_replicas(args: argparse.Namespace, devices: list[str], results: Results) -> None:
    """Replicas on 4 logical devices: 2 copies of 2 stages (each copy past the first reads its
    weights once, its gradient sums are added on copy 0's devices: the bytes against
    `benchmarks.traffic.least_bytes`), then 4 copies of 1 stage, whose gradients meet in
    collectives (`communication_hint`: NCCL where every device is a GPU of its own; TensorFlow's
    ring on logical GPUs that share one, as here), trained for one step."""
    import numpy as np

    import tfpipe
    from benchmarks.traffic import build, placed_and_least

    width, batch = (1024, 256) if not args.cpu_smoke else (128, 64)
    model, x, y = build("adam", width, 8 if not args.cpu_smoke else 2, batch)
    pipe = tfpipe.Pipeline(model, stages=2, replicas=2, devices=devices, micro_batches=4)
    sent, least = placed_and_least(pipe, x, y)
    placed = sum(t.nbytes or 0 for t in sent)
    results.put("replicas", "replicas=2", {"placed_mib": placed / MiB, "least_mib": least / MiB,
                                           "placed_ratio": placed / least, "devices": devices})
    print(f"[traffic] adam, replicas=2: {placed / MiB:.2f} MiB per step, least "
          f"{least / MiB:.2f} ({placed / least:.2f}x)", flush=True)
    model, x, y = build("adam", width, 8 if not args.cpu_smoke else 2, batch)
    pipe = tfpipe.Pipeline(model, stages=1, replicas=4, devices=devices, micro_batches=1)
    reducer = pipe.executor.reducer
    row: dict[str, Any] = {"communication_hint": reducer.hint if reducer else None,
                           "devices": devices, "status": "failed"}
    results.put("replicas", "replicas=4", row)
    history = pipe.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    loss = float(history.history["loss"][-1])
    row.update(status="trained" if np.isfinite(loss) else "not finite", loss=loss)
    results.put("replicas", "replicas=4", row)
    print(f"[traffic] adam, replicas=4: collectives {row['communication_hint']}, "
          f"{row['status']} (loss {loss:.4f})", flush=True)


def part_memory(args: argparse.Namespace, devices: list[str], mem: list[str],
                results: Results) -> None:
    """Per-device peaks of GPipe / 1F1B and 1F1B's recompute modes, K = all logical devices."""
    import tfpipe
    from benchmarks.common import deep_mlp, wide_data

    x, y = wide_data(args.mem_batch, args.mem_width)
    k = len(devices)
    fit: dict[str, Any] = dict(batch_size=len(x), epochs=1, verbose=0)
    setup = {"stages": k, "micro_batches": args.mem_micro_batches, "batch": args.mem_batch,
             "width": args.mem_width, "layers": args.mem_layers, "repeats": args.mem_repeats,
             "shared_allocator": args.cpu_smoke}
    results.put("memory", "setup", setup)
    rows = []
    for schedule, recompute in MEMORY_CONFIGS:
        pipe = tfpipe.Pipeline(
            deep_mlp(args.mem_width, args.mem_layers), stages=k,
            micro_batches=args.mem_micro_batches, schedule=schedule, recompute=recompute,
            devices=devices,
        )
        row = {"schedule": schedule, "recompute": recompute,
               **step_peaks(lambda p=pipe: p.fit(x, y, **fit), mem, args.mem_repeats),
               "predicted_in_flight": list(tfpipe.schedules.peak_in_flight(pipe.schedule))}
        rows.append(row)
        results.put("memory", "rows", rows)
        del pipe
        gc.collect()
    print(memory_table(rows, mem, setup), flush=True)


def memory_table(rows: list[dict[str, Any]], mem: list[str], setup: dict[str, Any]) -> str:
    lines = [
        f"[memory] K={setup['stages']} M={setup['micro_batches']} batch={setup['batch']} "
        f"{setup['layers']} x Dense({setup['width']}), median of {setup['repeats']}; "
        "MiB above the resting level per device"
        + ("; logical CPUs share one allocator: every column is the whole process"
           if setup["shared_allocator"] else ""),
        f"{'schedule':8} {'recompute':12}" + "".join(f"{d:>9}" for d in mem)
        + f"{'step s':>9}  in flight",
    ]
    for r in rows:
        cells = "".join(f"{'n/a' if v is None else f'{v:.1f}':>9}"
                        for v in r["peak_above_rest_mib"])
        lines.append(f"{r['schedule']:8} {r['recompute']:12}{cells}{r['step_s']:9.3f}  "
                     f"{r['predicted_in_flight']}")
    if any(v is None for r in rows for v in r["peak_above_rest_mib"]):
        lines.append("n/a: TensorFlow reports no allocator statistics for that device")
    return "\n".join(lines)


def promise_width(limit_gib: float, layers: int) -> int:
    """The MLP width whose weights are about 0.4 of a logical GPU: weights and Adam's two
    slots (3 x the weights, about 1.2 x the limit) cannot all sit on one logical GPU, while a
    quarter of them with Adam's slots, the gradient sum, one micro-batch's gradients and the
    new sum (6/4 x the weights, about 0.63 of a logical GPU) fit on each of four."""
    weights = 0.42 * limit_gib * 2**30
    return max(256, int(math.sqrt(weights / (4 * layers)) // 256 * 256))


def promise_model(width: int, layers: int, lr: float) -> Any:
    import keras

    from benchmarks.common import mlp

    keras.utils.set_random_seed(0)
    model = mlp(width=width, depth=layers)
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def promise_setup(args: argparse.Namespace) -> dict[str, Any]:
    width = args.promise_width or promise_width(args.memory_limit_gib, args.promise_layers)
    params = args.promise_layers * (width * width + width) + width * 10 + 10
    return {
        "width": width, "layers": args.promise_layers, "params": params,
        "weights_mib": round(4 * params / MiB, 1),
        "weights_and_adam_mib": round(12 * params / MiB, 1),
        "limit_mib": None if args.cpu_smoke else int(args.memory_limit_gib * 1024),
        "batch": args.promise_batch, "steps_per_epoch": args.promise_steps,
        "epochs": args.promise_epochs, "optimizer": f"Adam({args.promise_lr:g})",
    }


def is_oom(err: BaseException) -> bool:
    import tensorflow as tf

    text = str(err)
    return isinstance(err, tf.errors.ResourceExhaustedError) or any(
        s in text for s in ("OOM", "out of memory", "ResourceExhausted", "Out of memory")
    )


def part_promise_plain(args: argparse.Namespace, devices: list[str], mem: list[str],
                       results: Results) -> None:
    """Plain `model.fit` of the promise's model on the default (first logical) device."""
    from benchmarks.common import wide_data
    from tfpipe import allocator

    setup = promise_setup(args)
    results.put("promise", "setup", setup)
    x, y = wide_data(args.promise_batch * args.promise_steps, setup["width"])
    out: dict[str, Any] = {"device": devices[0]}
    try:
        allocator.reset(mem[0])
    except (ValueError, RuntimeError):
        pass
    start = time.perf_counter()
    try:
        model = promise_model(setup["width"], setup["layers"], args.promise_lr)
        history = model.fit(x, y, batch_size=args.promise_batch, epochs=1, verbose=0)
        out["status"] = "trained"
        out["losses"] = [round(float(v), 4) for v in history.history["loss"]]
        if args.cpu_smoke:
            out["note"] = "logical CPUs have no memory limit: the out-of-memory half needs a GPU"
        del model
    except Exception as err:  # the expected outcome on a GPU: out of memory
        out["status"] = "out of memory" if is_oom(err) else "failed"
        out["error_type"] = type(err).__name__
        out["error"] = str(err).strip().splitlines()[0][:400] if str(err).strip() else ""
    out["seconds"] = round(time.perf_counter() - start, 1)
    try:
        out["peak_mib"] = round(allocator.peak_bytes(mem[0]) / MiB, 1)
    except (ValueError, RuntimeError):
        out["peak_mib"] = None
    results.put("promise", "plain", out)
    print(f"[promise] plain model.fit, {setup['layers']} x Dense({setup['width']}) "
          f"({setup['params'] / 1e6:.0f} M parameters, weights + Adam "
          f"{setup['weights_and_adam_mib']:.0f} MiB) on {devices[0]}"
          + (f" limited to {setup['limit_mib']} MiB" if setup["limit_mib"] else "")
          + f": {out['status']}" + (f" ({out['error_type']}: {out['error'][:160]})"
                                   if "error" in out else ""), flush=True)


def part_promise_pipeline(args: argparse.Namespace, devices: list[str], mem: list[str],
                          results: Results) -> None:
    """tfpipe.fit of the same model, built in `tfpipe.build_scope()` (each weight made only on
    its stage's logical device), one 1F1B stage per logical device."""
    import numpy as np

    import tfpipe
    from benchmarks.common import wide_data
    from tfpipe import allocator

    setup = promise_setup(args)
    results.put("promise", "setup", setup)
    x, y = wide_data(args.promise_batch * args.promise_steps, setup["width"])
    k = len(devices)
    out: dict[str, Any] = {"stages": k, "schedule": "1f1b",
                           "micro_batches": args.promise_micro_batches,
                           "built_in": "tfpipe.build_scope() (no weight on GPU:0 first)"}
    start = time.perf_counter()
    try:
        with tfpipe.build_scope():
            model = promise_model(setup["width"], setup["layers"], args.promise_lr)
        pipe = tfpipe.Pipeline(model, stages=k, micro_batches=args.promise_micro_batches,
                               schedule="1f1b", devices=devices)
        out["stage_devices"] = [st.device for st in pipe.stages]
        out["stage_weights_mib"] = [
            round(sum(int(np.prod(v.shape)) * 4 for v in st.model.trainable_variables) / MiB, 1)
            for st in pipe.stages
        ]
        for d in mem:
            try:
                allocator.reset(d)
            except (ValueError, RuntimeError):
                pass
        history = pipe.fit(x, y, batch_size=args.promise_batch, epochs=args.promise_epochs,
                           verbose=0)
        losses = [float(v) for v in history.history["loss"]]
        out["losses"] = [round(v, 4) for v in losses]
        out["status"] = "trained" if all(math.isfinite(v) for v in losses) else "non-finite loss"
    except Exception as err:
        out["status"] = "out of memory" if is_oom(err) else "failed"
        out["error_type"] = type(err).__name__
        out["error"] = str(err).strip().splitlines()[0][:400] if str(err).strip() else ""
        traceback.print_exc()
    out["seconds"] = round(time.perf_counter() - start, 1)
    peaks: list[float | None] = []
    for d in mem:
        try:
            peaks.append(round(allocator.peak_bytes(d) / MiB, 1))
        except (ValueError, RuntimeError):
            peaks.append(None)
    out["peak_mib"] = peaks
    results.put("promise", "pipeline", out)
    print(f"[promise] tfpipe.fit, {k} stages (1F1B, M={args.promise_micro_batches}) on "
          f"{', '.join(devices)}: {out['status']}; losses {out.get('losses')}; peak MiB per "
          f"device {peaks}" + (f" of {setup['limit_mib']}" if setup["limit_mib"] else "")
          + (" (shared allocator: whole process)" if args.cpu_smoke else ""), flush=True)
    if out["status"] != "trained":
        raise SystemExit(1)


if __name__ == "__main__":
    sys.exit(main())
