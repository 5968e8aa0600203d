"""A convnet pipelined over two `tfpipe worker` processes: one stage per worker (per host).

What it shows: the steps of a real two-host run. Each stage of the model lives in its own
worker process (`tfpipe worker`, a TensorFlow `tf.distribute.Server`), with its own memory
and its own cores; this script is the *client*: it connects with `tfpipe.cluster`, passes
the workers' devices to `tfpipe.Pipeline`, and trains under a `tfpipe.Watchdog`. The model
and data are those of `convnet.py` (noisy drawings of rings, squares and lines, generated
with NumPy, nothing downloaded), split into 2 stages with the 1F1B schedule. It prints the
stage table, the loss per epoch, the test accuracy (about 97% after the default run, in
under a minute on 2 CPU cores with local workers), and where each stage's variables and
optimizer slots live.

On two real hosts (`h1` and `h2`, with the same tfpipe and TensorFlow versions installed):

    # 1. on h1, start worker task 0 (the same --cluster list everywhere, task 0 first)
    tfpipe worker --cluster h1:2222,h2:2222 --task 0
    # 2. on h2, start worker task 1 (or: TF_CONFIG='{"cluster": {"worker": ["h1:2222",
    #    "h2:2222"]}, "task": {"type": "worker", "index": 1}}' tfpipe worker)
    tfpipe worker --cluster h1:2222,h2:2222 --task 1
    # 3. on any machine that reaches both ports (h1 itself will do), run the client:
    python examples/two_host.py --cluster h1:2222,h2:2222 --threads 8 --backup ./backup
    # 4. when it is done, stop each worker with Ctrl-C (or SIGTERM)

Each worker prints `tfpipe worker I ready at HOST:PORT` once it accepts connections. Workers
run whatever a client asks and have no authentication: use a trusted network only.

If a worker dies during training, the script ends with a `WorkerUnavailableError` naming it
(exit status 75). Start that worker again with the same command, then run the client again
with the same `--backup` folder: `keras.callbacks.BackupAndRestore` restores the last
epoch's weights and optimizer state onto the workers and training resumes from there,
ending with the weights an uninterrupted run would have (see docs/cluster.md).

Without `--cluster` (or with `--local`) the script starts two workers on this machine
itself, on free loopback ports, runs the same client against them, and always stops them
at the end (two processes on one machine: real per-stage processes, not a speed-up).

Run:
    python examples/two_host.py                                        # two local workers
    python examples/two_host.py --epochs 2 --train 512 --image-size 16 --width 4   # seconds
    python examples/two_host.py --cluster h1:2222,h2:2222 --threads 8  # two real hosts
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tfpipe  # noqa: E402

STAGES = 2
EXIT_WORKER_UNAVAILABLE = 75  # as tfpipe's Watchdog uses: a temporary failure, retry


def free_port() -> int:
    """A loopback TCP port nothing listens on (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In a started worker (Linux): have the kernel send SIGTERM when this script dies, even
    if it is killed, so that no worker outlives it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_local_workers(n: int, log_dir: Path) -> tuple[list[str], list[subprocess.Popen[bytes]]]:
    """Starts `n` `tfpipe worker` processes on loopback; their output goes to `log_dir`."""
    addresses = [f"localhost:{free_port()}" for _ in range(n)]
    env = dict(os.environ)  # the workers import the same tfpipe as this script
    package_root = str(Path(tfpipe.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    procs = []
    for task in range(n):
        log = (log_dir / f"worker{task}.log").open("w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tfpipe", "worker", "--cluster", ",".join(addresses),
             "--task", str(task)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        ))
        log.close()  # the worker has its own copy
        print(f"started `tfpipe worker --cluster {','.join(addresses)} --task {task}` "
              f"(pid {procs[-1].pid})")
    return addresses, procs


def stop_workers(procs: list[subprocess.Popen[bytes]], log_dir: Path | None) -> None:
    """SIGTERM (a worker's normal stop, exit status 0), then SIGKILL after 10 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for task, proc in enumerate(procs):
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(timeout=10)
        if code not in (0, -signal.SIGTERM) and log_dir is not None:
            print(f"worker {task} exited with status {code}; its log:\n"
                  + (log_dir / f"worker{task}.log").read_text(errors="replace")[-2000:])
    print(f"stopped {len(procs)} local workers (pids {', '.join(str(p.pid) for p in procs)})")


def train(args: argparse.Namespace, devices: list[str]) -> None:
    """The client's work once connected: build, split over the workers, train, report."""
    import keras
    from convnet import CLASSES, build_model, make_shapes
    from example_setup import verbosity

    keras.utils.set_random_seed(0)
    x_train, y_train = make_shapes(args.train, args.image_size, seed=1)
    x_test, y_test = make_shapes(args.test, args.image_size, seed=3)
    model = build_model(args.image_size, args.width)
    steps = args.epochs * -(-args.train // args.batch_size)
    learning_rate = keras.optimizers.schedules.CosineDecay(3e-3, steps)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    pipe = tfpipe.Pipeline(model, stages=STAGES, devices=devices,
                           micro_batches=args.micro_batches, schedule="1f1b")
    pipe.summary()
    callbacks = [keras.callbacks.BackupAndRestore(args.backup)] if args.backup else []

    # Everything that touches the workers goes inside the watchdog's block.
    with tfpipe.Watchdog.for_pipeline(pipe, timeout_s=30):
        started = time.perf_counter()
        history = pipe.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
                           shuffle=False, callbacks=callbacks, verbose=verbosity())
        seconds = time.perf_counter() - started
        loss, accuracy = pipe.evaluate(x_test, y_test, batch_size=args.batch_size, verbose=0)
        placement = where_variables_live(pipe)
        if args.save:
            model.save(args.save)  # while the workers still hold the weights

    print("loss by epoch:", " ".join(f"{v:.4f}" for v in history.history["loss"]))
    print(f"trained {len(history.epoch)} epochs in {seconds:.1f} s")
    print(f"test loss {loss:.4f}, test accuracy {accuracy:.4f} (chance {1 / len(CLASSES):.2f})")
    print("\n".join(placement))
    if args.save:
        print(f"saved the trained model to {args.save}")


def where_variables_live(pipe: tfpipe.Pipeline) -> list[str]:
    """One line per stage (its variables' devices), one for the optimizer's variables."""
    lines = []
    for stage in pipe.stages:
        devices = sorted({v.value.device for v in stage.model.weights})
        lines.append(f"stage {stage.index}: {len(stage.model.weights)} variables on "
                     f"{', '.join(devices)}")
    counts = collections.Counter(v.value.device for v in pipe.model.optimizer.variables)
    lines.append("optimizer variables (Adam slots; the step counter stays on the client): "
                 + "; ".join(f"{n} on {d}" for d, n in sorted(counts.items())))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", help="the running workers, 'host:port,host:port' (task 0 "
                        "first); without it, two local workers are started")
    parser.add_argument("--local", action="store_true",
                        help="start two workers on this machine (the default without --cluster)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per worker (and for this process); default 1 with local "
                        "workers, TensorFlow's choice otherwise")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train", type=int, default=4000, help="training images")
    parser.add_argument("--test", type=int, default=500, help="test images")
    parser.add_argument("--image-size", type=int, default=24)
    parser.add_argument("--width", type=int, default=8, help="filters of the first conv layers")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--backup", help="BackupAndRestore folder: rerun with it to resume")
    parser.add_argument("--save", help="save the trained model here (.keras)")
    args = parser.parse_args()
    if args.local and args.cluster:
        parser.error("give --cluster or --local, not both")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # convnet.py, example_setup.py

    try:
        run(args)
    except tfpipe.WorkerUnavailableError as err:
        gc.collect()  # frees Keras's input iterator now rather than at exit (docs/cluster.md)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_WORKER_UNAVAILABLE)


def run(args: argparse.Namespace) -> None:
    """Trains on the given workers, or on two local ones started (and stopped) here."""
    if args.cluster:
        # Connect first, before TensorFlow starts in this process (thread limits).
        devices = tfpipe.cluster(args.cluster, threads=args.threads, timeout_s=60)
        print(f"connected to {args.cluster}: stages go to {devices}")
        train(args, devices)
        return

    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="tfpipe-workers-") as logs:
        try:
            addresses, procs = start_local_workers(STAGES, Path(logs))
            # Waits (up to 120 s) until both answer: starting TensorFlow takes a few seconds.
            devices = tfpipe.cluster(addresses, threads=args.threads or 1, timeout_s=120)
            print(f"connected to {','.join(addresses)}: stages go to {devices}")
            train(args, devices)
            gc.collect()  # drop the traced functions while the workers can still remove them
        finally:
            stop_workers(procs, Path(logs))

if __name__ == "__main__":
    main()
