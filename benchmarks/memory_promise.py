"""Issue #19: a model that one memory-capped worker cannot train trains on four, as planned.

Every worker is a `tfpipe worker` process in its own memory cgroup capped at `--cap` GiB
(`benchmarks/cgroups.py`): the kernel kills it past the cap, as a GPU runs out of memory.
The model, `--layers` x Dense(`--width`, relu) + Dense(10) on 256 inputs with Adam, is built
in `tfpipe.build_scope()` (its weights are made only on the workers). Printed:

1. the cap, the idle worker's usage (TensorFlow itself), and the model's training state:
   weights, Adam's two slots, gradients;
2. the plan: `tfpipe.plan(..., memory_budget=cap - idle)` over 1, 2 and 4 workers (1F1B and
   GPipe, no recompute), profiled in a separate client on logical CPU devices (memory
   predictions do not depend on the device's speed);
3. the whole model on one capped worker: killed or not, the error the client got, the
   group's failcnt and OOM kills;
4. each configuration the plan predicts to fit (the best `--configs` of distinct shape), each
   on fresh capped workers: per-worker peak (the group's `memory.max_usage_in_bytes` minus
   the idle usage) next to the plan's prediction, killed or not, the loss and the largest
   relative weight difference against plain `model.fit` in the client (uncapped), and the
   client's resident size before the model, after building, after placement and after
   training; the best configuration runs a second time with the model built the usual way,
   in the client, then moved (the client keeps no copy of the weights after placement).

Each run's client is its own process (a TensorFlow client connects to one cluster per
process), `python -m benchmarks.memory_promise --client ...`, which prints one JSON line.
Workers and clients run with oneDNN off (`TF_ENABLE_ONEDNN_OPTS=0`): oneDNN's CPU allocator,
on by default on x86, keeps freed blocks in pools, so a worker's peak ran 12-42% above the
bytes TensorFlow held at once (measured, 8 x Dense(4096), 1F1B on four workers), and a
client's resident size never fell after its weights left; the bytes held at once are what a
GPU's allocator limit sees.

Usage:
    python benchmarks/memory_promise.py [--cap 2] [--width 4096] [--layers 8] [--batch 64]
        [--steps 3] [--configs 4] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cgroups  # noqa: E402
from tfpipe.processes import worker_env  # noqa: E402

MIB = 2**20
INPUTS = 256
CLIENT_TIMEOUT_S = 600.0
RESULT = "RESULT "
ENV = {"TF_ENABLE_ONEDNN_OPTS": "0"}
"""The workers' and clients' environment beside this process's (see the module docstring)."""
QUICK = {"cap": 1.25, "width": 3072, "layers": 6, "batch": 32, "steps": 2, "configs": 1}


# the client (its own process) -------------------------------------------------------------


def _rss() -> tuple[int, int | None]:
    """This process's resident size (`VmRSS`) and the bytes TensorFlow's CPU allocator holds
    in use here (None where it keeps no statistics: `tfpipe.allocator`), in bytes. The
    allocator's figure is the one that says whether the client still holds the weights:
    oneDNN's CPU allocator keeps freed memory in a pool, so the resident size stays."""
    from tfpipe import allocator

    rss = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    in_use = None if allocator.unavailable("CPU:0") else allocator.current_bytes("CPU:0")
    return rss, in_use


def make_model(width: int, layers: int, seed: int = 3) -> Any:
    """`layers` x Dense(width, relu) + Dense(10) on 256 inputs, Adam, from `seed`."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((INPUTS,))]
        + [keras.layers.Dense(width, activation="relu", name=f"d{i}") for i in range(layers)]
        + [keras.layers.Dense(10, name="out")],
        name="wide_mlp",
    )


def compile_model(model: Any) -> None:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def data(n: int) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, INPUTS)).astype("float32")
    return x, (np.abs(x[:, :10]).argmax(axis=1)).astype("int32")


def client_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Plans on 4 logical CPU devices with the given budget; sizes the model's state."""
    import numpy as np

    import tfpipe

    devices = tfpipe.configure_cpu_devices(4)
    model = make_model(args.width, args.layers)
    compile_model(model)
    x, _ = data(args.batch)
    plan = tfpipe.plan(model, x, devices=devices, memory_budget=args.budget, stages=[1, 2, 4],
                       micro_batches=[4], schedules=["1f1b", "gpipe"], recompute=["never"],
                       profile_sizes=[max(args.batch // 4, 1)], repeats=1, parallel=True)
    weights = sum(int(np.prod(v.shape)) * 4 for v in model.trainable_weights)
    configs = [{"kwargs": c.kwargs(), "peaks": list(c.peak_bytes), "fits": c.fits}
               for c in plan.configs]
    return {"weights": weights, "configs": configs}


def client_run(args: argparse.Namespace) -> dict[str, Any]:
    """Trains on the workers (built in `build_scope`), then plain `model.fit` here."""
    import numpy as np

    import tfpipe

    devices = tfpipe.cluster(args.addresses, threads=1)
    config = json.loads(args.config)
    x, y = data(args.batch * args.steps)
    rss = {"start": _rss()}
    if args.host_built:  # the usual way: every weight made here first, then moved
        model = make_model(args.width, args.layers)
    else:
        with tfpipe.build_scope():
            model = make_model(args.width, args.layers)
    compile_model(model)
    rss["built"] = _rss()
    result: dict[str, Any] = {"error": None}
    try:
        pipe = tfpipe.Pipeline(model, devices=devices, **config)
        rss["placed"] = _rss()
        history = pipe.fit(x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0)
        rss["trained"] = _rss()
    except Exception as err:  # noqa: BLE001 (reported as it is: the benchmark's finding)
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        result["rss"] = rss
        return result
    result["loss"] = float(history.history["loss"][-1])
    reference = make_model(args.width, args.layers)
    compile_model(reference)
    plain = reference.fit(x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0)
    worst = 0.0
    for a, b in zip(reference.weights, model.weights):
        ref, got = a.numpy(), b.numpy()
        worst = max(worst, float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-12)))
    result.update(rss=rss, weight_rel_diff=worst,
                  reference_loss=float(plain.history["loss"][-1]))
    return result


def client(args: argparse.Namespace) -> None:
    out = client_plan(args) if args.client == "plan" else client_run(args)
    print(RESULT + json.dumps(out), flush=True)


# the driver ---------------------------------------------------------------------------------


def run_client(args: argparse.Namespace, mode: str, **extra: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.memory_promise", "--client", mode,
           "--width", str(args.width), "--layers", str(args.layers),
           "--batch", str(args.batch), "--steps", str(args.steps)]
    for key, value in extra.items():
        cmd += [f"--{key}"] + ([str(value)] if value != "" else [])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **ENV)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=CLIENT_TIMEOUT_S)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            found: dict[str, Any] = json.loads(line[len(RESULT):])
            return found
    raise RuntimeError(f"client {mode} printed no result (exit {done.returncode}):\n"
                       f"{done.stderr[-3000:]}")


def idle_usage(args: argparse.Namespace, logs: Path) -> int:
    """A ready, idle capped worker's group usage (TensorFlow, gRPC, the sentinel)."""
    (logs / "idle").mkdir()
    with cgroups.CappedWorkerPool(logs / "idle", limit=int(args.cap * cgroups.GIB),
                                  env=worker_env(ENV)) as pool:
        pool.start(1)
        time.sleep(2.0)
        usage = pool.reading(0).usage
    return int(usage or 0)


def capped_run(args: argparse.Namespace, logs: Path, name: str, config: dict[str, Any],
               workers: int, idle: int, host_built: bool = False) -> dict[str, Any]:
    """One configuration on fresh capped workers: the client's result and the groups'."""
    (logs / name).mkdir()
    with cgroups.CappedWorkerPool(logs / name, limit=int(args.cap * cgroups.GIB),
                                  env=worker_env(ENV)) as pool:
        addresses, started = pool.start(workers)
        flags = {"host-built": ""} if host_built else {}
        result = run_client(args, "run", addresses=",".join(addresses),
                            config=json.dumps(config), **flags)
        result["host_built"] = host_built
        time.sleep(0.5)  # a killed worker's group records the kill
        readings = [pool.reading(task) for task in range(workers)]
        result["killed"] = [w.proc.poll() == -9 for w in started]
        result["peaks"] = [(r.peak or 0) - idle for r in readings]
        result["failcnt"] = [r.failcnt for r in readings]
        result["oom_kills"] = [r.oom_kills for r in readings]
    return result


def chosen(configs: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The best `count` configurations predicted to fit, one per (stages, schedule)."""
    picked, seen = [], set()
    for c in configs:
        shape = (c["kwargs"]["stages"], c["kwargs"]["schedule"])
        if c["fits"] and shape not in seen:
            seen.add(shape)
            picked.append(c)
    return picked[:count]


def mib(n: float) -> str:
    return f"{n / MIB:8.1f}"


def report(args: argparse.Namespace, idle: int, plan: dict[str, Any], one: dict[str, Any],
           runs: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    w = plan["weights"]
    lines = [
        f"cap per worker {args.cap:.2f} GiB; idle worker {idle / MIB:.0f} MiB; budget for the "
        f"model {(args.cap * cgroups.GIB - idle) / MIB:.0f} MiB",
        f"model {args.layers} x Dense({args.width}) + Dense(10), Adam, batch {args.batch}: "
        f"weights {w / MIB:.0f} MiB, slots {2 * w / MIB:.0f} MiB, gradients {w / MIB:.0f} "
        f"MiB: {4 * w / MIB:.0f} MiB of training state",
        "",
        f"whole model on one capped worker: {'KILLED' if any(one['killed']) else 'not killed'}"
        f" (failcnt {one['failcnt'][0]}, oom kills {one['oom_kills'][0]}); client got: "
        f"{one['error']}",
        "",
        "config                     worker  predicted MiB  measured MiB  ratio  killed",
    ]
    for config, result in runs:
        k = config["kwargs"]
        name = f"K={k['stages']} {k['schedule']} M={k['micro_batches']}"
        name += " (host-built)" if result.get("host_built") else ""
        for i, (pred, got) in enumerate(zip(config["peaks"], result["peaks"])):
            lines.append(f"{name:26s} {i:6d}  {mib(pred):>13s}  {mib(got):>12s}  "
                         f"{got / pred:5.2f}  {result['killed'][i]}")
        if result.get("error"):
            lines.append(f"  error: {result['error']}")
        else:
            rss = result["rss"]
            lines.append(
                f"  loss {result['loss']:.4f} (plain model.fit {result['reference_loss']:.4f}); "
                f"largest relative weight difference {result['weight_rel_diff']:.1e}")
            lines.append("  client MiB (resident / TF allocator in use): " + ", ".join(
                f"{when} {mib(r).strip()} / {'-' if a is None else mib(a).strip()}"
                for when, (r, a) in rss.items()))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=float, default=2.0, help="GiB per worker")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--configs", type=int, default=4,
                        help="how many of the plan's fitting configurations to run")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="a small model, one config")
    parser.add_argument("--client", choices=["plan", "run"], help=argparse.SUPPRESS)
    parser.add_argument("--addresses", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--host-built", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(args)
        return
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    reason = cgroups.unavailable()
    if reason is not None:
        sys.exit(f"memory_promise: {reason}")
    with tempfile.TemporaryDirectory(prefix="tfpipe-promise-") as tmp:
        logs = Path(tmp)
        idle = idle_usage(args, logs)
        plan = run_client(args, "plan", budget=args.cap * cgroups.GIB - idle)
        whole = next(c for c in plan["configs"] if c["kwargs"]["stages"] == 1)
        one = capped_run(args, logs, "one", whole["kwargs"], 1, idle)
        picked = chosen(plan["configs"], args.configs)
        runs = [(c, capped_run(args, logs, f"config{i}", c["kwargs"], c["kwargs"]["stages"],
                               idle))
                for i, c in enumerate(picked)]
        if picked:  # the best again, built on the client first (its RSS after placement)
            best = picked[0]
            runs.append((best, capped_run(args, logs, "host", best["kwargs"],
                                          best["kwargs"]["stages"], idle, host_built=True)))
    lines = report(args, idle, plan, one, runs)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"idle": idle, "plan": plan, "one": one,
                                         "runs": [r for _, r in runs]}, indent=1))


if __name__ == "__main__":
    main()
