"""Train a model that one device cannot hold, on four devices that each hold a quarter of it.

What it shows: the memory promise, under a real limit. Each worker is a `tfpipe worker`
process in its own memory cgroup (a stand-in for a GPU's memory: the kernel kills a process
past its cap, as a GPU runs out of memory). The model, a wide MLP with Adam whose training
needs more than a worker's cap (by default 8 x Dense(4096): 3.3 GiB at its peak on one
uncapped worker, against a 2 GiB cap), is built inside `tfpipe.build_scope()`, so none of its
weights exists before the pipeline makes each one on its stage's worker. The script:

1. trains it on one capped worker: the kernel kills the worker, and the client gets a
   `tfpipe.WorkerOutOfMemoryError` naming the worker, the limit and the fix;
2. trains it on four capped workers, one 1F1B stage each: it trains, and the script prints
   each worker's peak (its cgroup's `memory.max_usage_in_bytes`) against the cap.

The same recipe on GPUs: build the model in `tfpipe.build_scope()` (Keras would otherwise
make every weight on GPU:0 first), give each stage a device of its own (one `tfpipe worker
--gpu I` per GPU, or `devices=["/gpu:0", ...]` in one process with memory growth on),
use `schedule="1f1b"` (at most K micro-batches' activations per stage), and if a stage still
does not fit, `recompute="except_last"`; `tfpipe.plan(model, x, memory_budget="70GiB")`
ranks configurations by their predicted memory per device.

Needs Linux, root (or a delegated cgroup) and cgroup v1's memory controller; elsewhere it
says why and stops. The workers and their cgroups are always removed at the end.

Run:
    python examples/bigger_than_one_device.py             # cap 2 GiB, 8 x Dense(4096): minutes
    python examples/bigger_than_one_device.py --quick     # cap 1.25 GiB, 7 x Dense(3072)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
SIZES = {False: (2.0, 4096, 8), True: (1.25, 3072, 7)}  # quick -> (cap GiB, width, layers)


def client(args: argparse.Namespace) -> int:
    """The part a user writes: connect, build in the scope, train pipelined."""
    import keras
    import numpy as np

    import tfpipe

    devices = tfpipe.cluster(args.addresses, threads=1)
    with tfpipe.build_scope():  # no weight is made here, nor on GPU:0
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((256,))]
            + [keras.layers.Dense(args.width, activation="relu") for _ in range(args.layers)]
            + [keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3 * 64, 256)).astype("float32")
    y = np.abs(x[:, :10]).argmax(axis=1)
    weights = sum(int(np.prod(v.shape)) * 4 for v in model.weights)
    print(f"model: {args.layers} x Dense({args.width}), weights {weights / 2**20:.0f} MiB, "
          f"with Adam's slots and gradients {4 * weights / 2**20:.0f} MiB")
    try:
        history = tfpipe.fit(model, x, y, batch_size=64, epochs=1, verbose=0, shuffle=False,
                             devices=devices, micro_batches=4, schedule="1f1b")
    except tfpipe.WorkerOutOfMemoryError as err:
        print(f"out of memory: {err}")
        return 0
    print(f"trained on {len(devices)} workers, loss {history.history['loss'][-1]:.4f}")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Starts capped workers (1, then 4) and runs the client against each set."""
    from benchmarks import cgroups

    reason = cgroups.unavailable()
    if reason is not None:
        print(f"cannot cap workers here: {reason}")
        return 0
    cap, width, layers = SIZES[args.quick]
    print(f"each worker capped at {cap} GiB")
    with tempfile.TemporaryDirectory(prefix="tfpipe-bigger-") as tmp:
        for n in (1, 4):
            logs = Path(tmp) / f"workers{n}"
            logs.mkdir()
            with cgroups.CappedWorkerPool(logs, limit=int(cap * GIB)) as pool:
                addresses, _ = pool.start(n)
                done = subprocess.run(
                    [sys.executable, __file__, "--client", "--addresses", ",".join(addresses),
                     "--width", str(width), "--layers", str(layers)],
                    capture_output=True, text=True, timeout=600)
                print(f"\n--- {n} worker(s) ---\n{done.stdout.strip()}")
                if done.returncode != 0:
                    print(done.stderr[-2000:])
                    return done.returncode
                peaks = [pool.reading(t).peak or 0 for t in range(n)]
                print("worker peaks (GiB): "
                      + ", ".join(f"{p / GIB:.2f}" for p in peaks) + f" of {cap} each")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller cap and model")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--addresses", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    return client(args) if args.client else demo(args)


if __name__ == "__main__":
    sys.exit(main())
