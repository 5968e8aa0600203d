"""The client side of tests/test_memory_cap.py, run as its own process (a TensorFlow client can
connect to one cluster per process). Prints one JSON line prefixed with `RESULT `.

Modes:
    oom ADDRESS      `tfpipe.fit` of the wide MLP on the one (capped) worker at ADDRESS, no
                     watchdog: reports the error it ends with. Then, against the worker's
                     sentinel: what `tfpipe.Watchdog` diagnoses from that step's TensorFlow
                     error, what entering a `Watchdog` raises, and what waiting for the
                     worker (`tfpipe.cluster`'s first step) raises.
    fit ADDRESSES    plain `model.fit` here (uncapped), then `tfpipe.fit` of a fresh copy on
                     the workers, one stage each, 1F1B; reports the largest relative weight
                     difference.

`--width W --layers L --batch B --steps S` size the model and the run (the test's defaults).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tfpipe  # noqa: E402
from benchmarks.memory_promise import compile_model, data  # noqa: E402
from benchmarks.memory_promise import make_model as promise_model  # noqa: E402

cluster_module = importlib.import_module("tfpipe.cluster")  # `tfpipe.cluster` is the function


def make_model(width: int, layers: int, seed: int = 3) -> Any:
    """The memory benchmark's model (`layers` x Dense(width, relu) + Dense(10) on 256
    inputs), compiled with Adam."""
    model = promise_model(width, layers, seed)
    compile_model(model)
    return model


def run_oom(args: argparse.Namespace) -> dict[str, Any]:
    devices = tfpipe.cluster(args.addresses, threads=1)
    x, y = data(args.batch * args.steps)
    model = make_model(args.width, args.layers)
    started = time.monotonic()
    result: dict[str, Any] = {"error": None}
    cause: BaseException | None = None
    try:
        tfpipe.fit(model, x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0,
                   devices=devices, stages=1)
    except Exception as err:  # noqa: BLE001 (reported to the test as it is)
        cause = err.__cause__
        result.update(describe(err))
    result["seconds_to_error"] = time.monotonic() - started
    gc.collect()  # release the failed fit's iterator now (see docs/cluster.md)
    import tensorflow as tf

    if isinstance(cause, tf.errors.OpError):
        dog = tfpipe.Watchdog(args.addresses, timeout_s=5.0,
                              stages_by_address={args.addresses: [0]})
        diagnosed = dog._diagnose(cause)  # noqa: SLF001 (the watchdog's own diagnosis)
        result["watchdog_diagnosis"] = describe(diagnosed) if diagnosed else None
    try:
        with tfpipe.Watchdog(args.addresses, timeout_s=5.0):
            pass
        result["watchdog_enter"] = None
    except Exception as err:  # noqa: BLE001
        result["watchdog_enter"] = describe(err)
    try:
        cluster_module.wait_for_workers([args.addresses], 5.0)
        result["connect"] = None
    except Exception as err:  # noqa: BLE001
        result["connect"] = describe(err)
    return result


def describe(err: BaseException) -> dict[str, Any]:
    fields = {"error": type(err).__name__, "message": str(err)[:3000],
              "cause": type(err.__cause__).__name__ if err.__cause__ else None}
    for name in ("address", "task", "stages", "limit", "peak", "reason", "device"):
        value = getattr(err, name, None)
        fields[name] = list(value) if isinstance(value, tuple) else value
    return fields


def run_fit(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    devices = tfpipe.cluster(args.addresses, threads=1)
    x, y = data(args.batch * args.steps)
    reference = make_model(args.width, args.layers)
    started = time.monotonic()
    reference.fit(x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0)
    plain_s = time.monotonic() - started
    model = make_model(args.width, args.layers)
    started = time.monotonic()
    history = tfpipe.fit(model, x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0,
                         devices=devices, stages=len(devices), schedule="1f1b",
                         micro_batches=args.micro_batches)
    pipelined_s = time.monotonic() - started
    relative = [float(np.max(np.abs(a.numpy() - b.numpy())) / max(np.max(np.abs(b.numpy())),
                                                                   1e-12))
                for a, b in zip(model.weights, reference.weights)]
    return {
        "stage_devices": [s.device for s in history.pipeline.stages],
        "stage_layers": [list(s.names) for s in history.pipeline.stages],
        "loss": history.history["loss"], "relative_diffs": relative,
        "plain_seconds": plain_s, "pipelined_seconds": pipelined_s,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["oom", "fit"])
    parser.add_argument("addresses")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batches", type=int, default=4)
    args = parser.parse_args(argv)
    result = run_oom(args) if args.mode == "oom" else run_fit(args)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
