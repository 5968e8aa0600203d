"""The client side of tests/test_cluster.py, run as its own process (`python cluster_client.py MODE ...`).

The pytest process has already initialised TensorFlow with four logical CPU devices, and a
cluster connection would stay in its context after the workers are gone; a separate process
keeps both apart. Prints one JSON line prefixed with `RESULT ` and exits 0 when the scenario
ran (its assertions are the test's).

Modes:
    fit ADDRESSES          plain model.fit here, then the same pipelined on the workers.
    kill|stop ADDRESSES PID TIMEOUT
                           pipelined fit under a Watchdog(timeout_s=TIMEOUT); once training
                           runs, SIGKILL / SIGSTOP the worker process PID.
    replicas ADDRESSES     plain model.fit here, then 2 replicas x 2 stages on four workers.
    nested ADDRESSES       as `fit`, for a subclassed task model holding a Functional
                           backbone (traced, and the backbone read through), split inside it.
    handover ADDRESSES     two one-thread workers (`tfpipe.cluster(threads=1)`): when worker
                           1 got a tensor worker 0 made before a long computation, and when
                           worker 0 ended that computation.
    stuck ADDRESSES PID TIMEOUT EXIT_AFTER
                           as `stop`, with the watchdog's interruption disabled: the process
                           must end with EXIT_WORKER_UNAVAILABLE after EXIT_AFTER seconds.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfpipe  # noqa: E402

cluster_module = importlib.import_module("tfpipe.cluster")  # `tfpipe.cluster` is the function
watchdog_module = importlib.import_module("tfpipe.watchdog")


def make_model(seed: int = 7) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((16,))]
        + [keras.layers.Dense(32, activation="tanh", name=f"d{i}") for i in range(4)]
        + [keras.layers.Dense(3, name="out")]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def data(n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 16)).astype("float32")
    y = (x[:, :3].argmax(axis=1)).astype("int32")
    return x, y


class Losses(keras.callbacks.Callback):
    """Records the loss Keras reports after every batch, and signals the first batch."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []
        self.started = threading.Event()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.losses.append(float(logs["loss"]))
        self.started.set()


def device_task(device: str) -> str:
    spec = tf.DeviceSpec.from_string(device)
    return "client" if spec.job in (None, "localhost") else f"task:{spec.task}"


def called_functions(op: tf.Operation) -> list[str]:
    """The functions an op runs: a call's function, a loop's condition and body, a branch."""
    names = []
    for value in op.node_def.attr.values():
        if value.HasField("func"):
            names.append(value.func.name)
        names += [f.name for f in value.list.func]
    return names


def graph_ops(pipe: tfpipe.Pipeline, batch: tuple) -> list[tuple[tf.Operation, str]]:
    """Every op of the pipeline's training step traced on `batch`, with the device it asks for,
    the bodies of the functions it calls included: an op in a body without a device of its own
    runs on the device of the call (a stage function called under its stage's device)."""
    with pipe._attached():  # noqa: SLF001 (tests only): the optimizer hook fit installs
        concrete = tf.function(pipe.executor.train_step, autograph=False).get_concrete_function(batch)
    ops: list[tuple[tf.Operation, str]] = []
    seen: set[tuple[str, str]] = set()

    def walk(graph: tf.Graph, device: str, known: dict) -> None:
        known = {**known, **getattr(graph, "_functions", {})}
        for op in graph.get_operations():
            placed = op.device or device
            ops.append((op, placed))
            for name in called_functions(op):  # calls, and loop and branch bodies (rank loops)
                fn = known.get(name)
                if fn is not None and hasattr(fn, "graph") and (name, placed) not in seen:
                    seen.add((name, placed))
                    walk(fn.graph, placed, known)

    walk(concrete.graph, "", {})
    return ops


def run_fit(addresses: str) -> dict:
    devices = tfpipe.cluster(addresses, threads=1)  # thread limits go before TensorFlow starts
    x, y = data()
    reference = make_model()  # plain Keras, in this process
    ref_losses = Losses()
    reference.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
                  callbacks=[ref_losses])

    model = make_model()
    pipe = tfpipe.Pipeline(model, stages=2, devices=devices, micro_batches=4)
    losses = Losses()
    with tfpipe.Watchdog.for_pipeline(pipe, timeout_s=30):
        history = pipe.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
                           callbacks=[losses])
        weights = [w.numpy() for w in model.weights]
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(weights, reference.get_weights())]

    refused = {}
    for name in ("/job:worker/replica:0/task:7/device:CPU:0", "/device:CPU:3"):
        try:
            tfpipe.Pipeline(make_model(), stages=2, devices=[devices[0], name])
            refused[name] = None
        except tfpipe.PipelineError as err:
            refused[name] = str(err)
    partial = tfpipe.Pipeline(make_model(), stages=2, devices=["/job:worker/task:0", "/job:worker/task:1"])
    one_f_one_b = {"stages": 2, "micro_batches": 4, "schedule": "1f1b"}
    steps = [tfpipe.Pipeline(make_model(), devices=devices, **one_f_one_b),
             tfpipe.Pipeline(make_model(), devices=devices, rank_loops="steady", **one_f_one_b),
             tfpipe.Pipeline(make_model(), devices=[devices[0]] * 2, **one_f_one_b)]

    variables = {v.path: device_task(v.value.device) for v in model.weights}
    optimizer = model.optimizer
    slots = {}  # each trainable variable's Adam slots (m, v): their devices
    for var in model.trainable_variables:
        index = optimizer._get_variable_index(var)  # noqa: SLF001 (tests only)
        slots[var.path] = [device_task(optimizer._momentums[index].value.device),  # noqa: SLF001
                           device_task(optimizer._velocities[index].value.device)]  # noqa: SLF001
    by_kind: dict[str, list[str]] = {}
    for op, device in graph_ops(pipe, (tf.constant(x[:32]), tf.constant(y[:32]))):
        if op.type in ("MatMul", "BiasAddGrad", "TanhGrad", "AssignSubVariableOp",
                       "AssignAddVariableOp", "AssignVariableOp"):
            by_kind.setdefault(op.type, []).append(device_task(device) if device else "")
    return {
        "devices": devices,
        "default_devices": tfpipe.default_devices(),
        "worker_devices": tfpipe.worker_devices(),
        "refused": refused,
        "partial_stage_devices": [s.device for s in partial.stages],
        "reference_devices": sorted({device_task(v.value.device) for v in reference.weights}),
        "stage_devices": [s.device for s in pipe.stages],
        "stage_variables": [[v.path for v in s.model.weights] for s in pipe.stages],
        "losses": losses.losses, "reference_losses": ref_losses.losses,
        "history_loss": history.history["loss"],
        "weight_diffs": diffs,
        "variables": variables, "slots": slots, "ops": by_kind,
        "summary": pipe.summary(print_fn=lambda _: None),
        # which step each runs: the default on two workers, asked for, on one worker
        "loops": [type(p.executor.loops).__name__ for p in steps],
    }


def run_replicas(addresses: str) -> dict:
    devices = tfpipe.cluster(addresses, threads=1)
    x, y = data()
    reference = make_model()
    ref_losses = Losses()
    reference.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
                  callbacks=[ref_losses])
    model = make_model()
    pipe = tfpipe.Pipeline(model, stages=2, replicas=2, devices=devices, micro_batches=2,
                           schedule="1f1b")
    losses = Losses()
    with tfpipe.Watchdog.for_pipeline(pipe, timeout_s=60):
        pipe.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0, callbacks=[losses])
    weights = [w.numpy() for w in model.weights]
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(weights, reference.get_weights())]
    ops = graph_ops(pipe, (tf.constant(x[:32]), tf.constant(y[:32])))
    # each stage's gradient sums: copy 1's added to copy 0's on copy 0's worker
    reduces = [(device_task(device), device_task(op.inputs[1].device)) for op, device in ops
               if "_reduce/" in op.name and op.type == "AddV2"]
    collectives = [op.name for op, _ in ops if op.type.startswith("Collective")]
    return {
        "replica_devices": pipe.replica_devices,
        "variables": sorted({device_task(v.value.device) for v in model.weights}),
        "losses": losses.losses, "reference_losses": ref_losses.losses,
        "weight_diffs": diffs, "reduces": reduces, "collectives": collectives,
    }


class Task(keras.Model):
    """A subclassed task around a nested Functional backbone, as KerasHub tasks are built."""

    def __init__(self) -> None:
        super().__init__()
        inputs = keras.Input((16,))
        h = inputs
        for i in range(4):
            h = keras.layers.Dense(32, activation="tanh", name=f"block_{i}")(h)
        self.backbone = keras.Model(inputs, h, name="backbone")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return self.head(self.backbone(x))


def make_task(seed: int = 7) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = Task()
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model(np.zeros((1, 16), "float32"))
    return model


def run_nested(addresses: str) -> dict:
    devices = tfpipe.cluster(addresses, threads=1)
    x, y = data()
    reference, ref_losses = make_task(), Losses()
    reference.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
                  callbacks=[ref_losses])
    model, losses = make_task(), Losses()
    history = tfpipe.fit(model, x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
                         callbacks=[losses], split_points=["block_2"], devices=devices,
                         micro_batches=4, schedule="1f1b")
    diffs = [float(np.max(np.abs(a.numpy() - b.numpy())))
             for a, b in zip(model.weights, reference.weights)]
    return {
        "stage_names": [st.names for st in history.pipeline.stages],
        "variables": {v.path: device_task(v.value.device) for v in model.weights},
        "losses": losses.losses, "reference_losses": ref_losses.losses,
        "weight_diffs": diffs,
    }


def run_failure(mode: str, addresses: str, pid: int, timeout_s: float,
                exit_after_s: float | None = None) -> dict:
    x, y = data(4096)
    devices = tfpipe.cluster(addresses, threads=1)
    model = make_model()
    pipe = tfpipe.Pipeline(model, stages=2, devices=devices, micro_batches=4)
    losses = Losses()
    signalled: list[float] = []

    def strike() -> None:
        losses.started.wait(60)
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
        signalled.append(time.monotonic())
        print(f"SIGNALLED {mode}", flush=True)

    if mode == "stuck":  # the fallback: interruption impossible, the process must end itself
        watchdog_module.close_connections = lambda address: 0
    threading.Thread(target=strike, daemon=True).start()
    kwargs = {} if exit_after_s is None else {"exit_after_s": exit_after_s}
    result: dict = {}
    try:
        with tfpipe.Watchdog.for_pipeline(pipe, timeout_s=timeout_s, **kwargs):
            pipe.fit(x, y, batch_size=32, epochs=1000, shuffle=False, verbose=0,
                     callbacks=[losses])
        result["error"] = None
    except tfpipe.WorkerUnavailableError as err:
        result.update(error=type(err).__name__, message=str(err), address=err.address,
                      task=err.task, stages=list(err.stages or ()), reason=err.reason,
                      cause=type(err.__cause__).__name__ if err.__cause__ else None)
    except Exception as err:  # noqa: BLE001 (reported to the test as it is)
        result.update(error=type(err).__name__, message=str(err)[:2000])
    done = time.monotonic()
    # Release Keras's tf.data iterator, kept alive by the failed call's traceback cycle, now:
    # destroyed at interpreter exit instead, it waited up to tf.data's autotune period
    # (over 4 s in 3 of 10 runs, 38 s and 55 s where timed) for the autotune thread to wake.
    result["gc_seconds"] = _timed(gc.collect)
    result["seconds_after_signal"] = done - signalled[0] if signalled else None
    result["batches"] = len(losses.losses)
    return result


def run_handover(addresses: str) -> dict:
    """Worker 0 makes `a`, then (after `a`) a chain of 40 matrix products `b`; worker 1 reads
    `a` (`benchmarks/send_delay.py`'s `handover`, its reproduction for upstream). The times at
    which `b` started and ended on worker 0 and `a` was on worker 1, per run."""
    from benchmarks.send_delay import handover

    d0, d1 = tfpipe.cluster(addresses, threads=1)
    runs = handover(d0, d1, 3)
    return {"threads": [tf.config.threading.get_intra_op_parallelism_threads(),
                        tf.config.threading.get_inter_op_parallelism_threads()],
            "b_started": [r[0] for r in runs], "a_on_worker1": [r[1] for r in runs],
            "b_done": [r[2] for r in runs]}


def _timed(fn: object) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def main(argv: list[str]) -> None:
    mode, addresses = argv[0], argv[1]
    started = time.monotonic()
    if mode == "fit":
        result = run_fit(addresses)
    elif mode == "replicas":
        result = run_replicas(addresses)
    elif mode == "nested":
        result = run_nested(addresses)
    elif mode == "handover":
        result = run_handover(addresses)
    else:
        result = run_failure(mode, addresses, int(argv[2]), float(argv[3]),
                             float(argv[4]) if len(argv) > 4 else None)
    result["client_seconds"] = time.monotonic() - started
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
