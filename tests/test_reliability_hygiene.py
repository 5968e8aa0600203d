"""Reliability: tfpipe cleans up after itself.

- Repeated `tfpipe.fit` calls in one process leave no threads behind and do not grow memory.
- A `tfpipe.fit` leaves TensorFlow's and Keras's global settings and the user's model as it
  found them (device placement, logging, mixed precision, eager mode, the model's step
  methods, traced functions and `jit_compile`, the optimizer's `update_step`), also when the
  fit stops with an error half-way.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.eager import context
from tensorflow.python.framework import func_graph, ops

import tfpipe
from tests.models import build, data

MIB = 1024 * 1024
WARM_UP, CALLS = 3, 20
# Measured on 2 CPU cores (TF 2.21, Keras 3.15), 20 calls after 3 warm-up calls, tiny MLP:
# - one Pipeline reused (`pipe.fit` 20 times): -2..+1 MiB;
# - 20 `tfpipe.fit` calls: +32..37 MiB, growing linearly (~1.7 MiB a call, 99 MiB after 60),
#   because every call traces a new step and TensorFlow's global gradient registry keeps each
#   traced graph (the assertion message below says so); with those entries dropped: -4..+3 MiB.
# 10 MiB over 20 calls leaves room for allocator noise and still catches a leak of 0.5 MiB
# a call.
RSS_BOUND = 10 * MIB


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def live(kind: type) -> int:
    return sum(isinstance(o, kind) for o in gc.get_objects())


def custom_gradients() -> int:
    """Entries TensorFlow's global gradient registry holds for graph-mode `tf.custom_gradient`s."""
    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", {})
    return sum(k.startswith("CustomGradient-") for k in registry)


def measure(call) -> dict[str, int]:
    """Runs `call` WARM_UP times, then CALLS times, and returns the growth over the CALLS."""
    for _ in range(WARM_UP):
        call()
    gc.collect()
    before = dict(py=threading.active_count(), os=os_threads(), rss=rss_bytes(),
                  graphs=live(func_graph.FuncGraph), registry=custom_gradients())
    for _ in range(CALLS):
        call()
    gc.collect()
    after = dict(py=threading.active_count(), os=os_threads(), rss=rss_bytes(),
                 graphs=live(func_graph.FuncGraph), registry=custom_gradients())
    return {k: after[k] - before[k] for k in before}


def _growth_of_repeated_tfpipe_fit() -> dict[str, int]:
    x, y = data("mlp", n=32)
    model = build("mlp", "sgd")

    def call():
        tfpipe.fit(model, x, y, batch_size=16, epochs=1, stages=4, micro_batches=2, verbose=0)

    return measure(call)


def _growth_of_repeated_pipe_fit() -> dict[str, int]:
    x, y = data("mlp", n=32)
    pipe = tfpipe.Pipeline(build("mlp", "sgd"), stages=4, micro_batches=2)
    return measure(lambda: pipe.fit(x, y, batch_size=16, epochs=1, verbose=0))


def in_fresh_process(name: str) -> dict[str, int]:
    """Runs one growth measurement in a new Python process (four logical CPU devices).

    RSS growth in the suite's own long-lived process depends on what earlier tests left in
    the heap (5-23 MiB over 20 fits after other tests, under 3 MiB alone), so the leak
    measurement runs where only these fits allocate.
    """
    root = Path(__file__).resolve().parents[1]
    code = (
        "import json, tfpipe; tfpipe.configure_cpu_devices(4); "
        "from tests import test_reliability_hygiene as t; "
        f"print('GROWTH ' + json.dumps(t.{name}()))"
    )
    env = {**os.environ, "PYTHONPATH": str(root), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("GROWTH "))
    return json.loads(line[len("GROWTH "):])


def test_repeated_tfpipe_fit_leaks_no_threads_and_no_memory():
    growth = in_fresh_process("_growth_of_repeated_tfpipe_fit")
    assert growth["py"] == 0, f"{growth['py']} Python threads left behind by {CALLS} fits"
    assert growth["os"] <= 0, f"{growth['os']} OS threads left behind by {CALLS} fits"
    assert growth["rss"] < RSS_BOUND, (
        f"RSS grew {growth['rss'] / MIB:.1f} MiB over {CALLS} tfpipe.fit calls (bound "
        f"{RSS_BOUND / MIB:.0f} MiB). Still alive: {growth['graphs']} more traced FuncGraphs and "
        f"{growth['registry']} more 'CustomGradient-*' entries in TensorFlow's global gradient "
        "registry: each call traces a new step whose optimizer all-reduce "
        "(tf.distribute ReplicaContext.all_reduce, a graph-mode tf.custom_gradient) registers a "
        "gradient function that holds the step's graph forever."
    )


def test_repeated_fit_on_one_pipeline_leaks_no_threads_and_no_memory():
    growth = in_fresh_process("_growth_of_repeated_pipe_fit")
    assert growth["py"] == 0 and growth["os"] <= 0, growth
    assert growth["graphs"] == 0, growth  # the traced step is reused, not traced again
    assert growth["rss"] < RSS_BOUND, f"RSS grew {growth['rss'] / MIB:.1f} MiB over {CALLS} fits"


def test_tfpipe_fit_adds_nothing_to_the_users_layers():
    """Splitting builds each stage as a Keras sub-model of the user's layers (Keras clones the
    graph from intermediate inputs: one node per layer of stages 1 and later); repeated fits
    with the same options reuse that pipeline and add nothing more (nodes live as long as the
    model)."""
    x, y = data("mlp", n=32)
    model = build("mlp", "sgd")
    tfpipe.fit(model, x, y, batch_size=16, epochs=1, stages=4, micro_batches=2, verbose=0)
    nodes = [len(layer._inbound_nodes) for layer in model.layers]
    assert nodes == [1, 2, 2, 2]
    for _ in range(3):
        tfpipe.fit(model, x, y, batch_size=16, epochs=1, stages=4, micro_batches=2, verbose=0)
    assert [len(layer._inbound_nodes) for layer in model.layers] == nodes


# --- global state ---------------------------------------------------------------------------


def global_state() -> dict:
    return {
        "soft_device_placement": tf.config.get_soft_device_placement(),
        "log_device_placement": context.context().log_device_placement,
        "mixed_precision_policy": keras.mixed_precision.global_policy().name,
        "functions_run_eagerly": tf.config.functions_run_eagerly(),
        "distribution_strategy": tf.distribute.has_strategy(),
        "device_scope": context.context().device_name,
    }


def model_state(model: keras.Model) -> dict:
    opt = model.optimizer
    return {
        "jit_compile": model.jit_compile,
        "own step attributes": sorted(k for k in ("train_step", "test_step", "predict_step")
                                      if k in model.__dict__),
        "train_step": type(model).train_step,
        "test_step": type(model).test_step,
        "predict_step": type(model).predict_step,
        "bound train_step": model.train_step.__func__,
        "optimizer update_step wrapped": "update_step" in opt.__dict__,
        "optimizer update_step": type(opt).update_step,
    }


class RaiseAtBatch(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 1:
            raise RuntimeError("callback failure in the middle of an epoch")


def set_user_settings(kind: str):
    """The user's global settings: TensorFlow's defaults, or changed from them; returns a
    function that puts back what was there."""
    saved = global_state()
    if kind == "changed":
        tf.config.set_soft_device_placement(False)
        tf.debugging.set_log_device_placement(True)
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    if kind == "eager":
        tf.config.run_functions_eagerly(True)

    def restore():
        tf.config.set_soft_device_placement(saved["soft_device_placement"])
        tf.debugging.set_log_device_placement(saved["log_device_placement"])
        keras.mixed_precision.set_global_policy(saved["mixed_precision_policy"])
        tf.config.run_functions_eagerly(saved["functions_run_eagerly"])

    return restore


# "changed": soft placement off, placement logging on, mixed_bfloat16 and a model compiled
# with jit_compile=True; "eager": every tf.function runs eagerly. Logging every op's
# placement is slow, so the changed settings run only with the harder outcome.
@pytest.mark.parametrize("settings, outcome", [
    ("defaults", "completes"), ("defaults", "raises"), ("changed", "raises"), ("eager", "raises"),
])
@pytest.mark.filterwarnings("ignore:Even though the `tf.config.experimental_run_functions_eagerly`")
def test_fit_leaves_global_and_model_state_as_found(settings, outcome, capfd):
    restore = set_user_settings(settings)
    try:
        check_state_kept(jit=settings == "changed", raises=outcome == "raises")
    finally:
        restore()
        capfd.readouterr()  # drop the device-placement log of the "changed" settings


def check_state_kept(jit: bool, raises: bool) -> None:
    x, y = data("mlp", n=32)
    model = build("mlp", "adam", jit_compile=jit)
    model.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0)  # the user's own traced step
    before_global, before_model = global_state(), model_state(model)
    functions = {n: getattr(model, n) for n in ("train_function", "test_function",
                                                "predict_function")}
    assert functions["train_function"] is not None

    if raises and jit:
        with pytest.raises(RuntimeError, match="callback failure"), pytest.warns(UserWarning):
            tfpipe.fit(model, x, y, batch_size=8, stages=4, micro_batches=2, verbose=0,
                       callbacks=[RaiseAtBatch()])
    elif raises:
        with pytest.raises(RuntimeError, match="callback failure"):
            tfpipe.fit(model, x, y, batch_size=8, stages=4, micro_batches=2, verbose=0,
                       callbacks=[RaiseAtBatch()])
    else:
        tfpipe.fit(model, x, y, batch_size=8, stages=4, micro_batches=2, verbose=0)

    assert global_state() == before_global
    if jit:  # the placed variables rule XLA out: tfpipe turns the flag off, with a warning
        assert model.jit_compile is False
        before_model["jit_compile"] = False
    assert model_state(model) == before_model
    # The user's traced functions are kept, or dropped (None) when tfpipe moved the variables
    # they captured, so that Keras traces them again; never left as tfpipe's pipelined step.
    for name, before in functions.items():
        assert getattr(model, name) in (before, None), name
    if jit:
        return  # plain XLA steps after tfpipe.fit: see the test below
    # The next plain fit runs Keras's own step: exactly what plain Keras gives from these weights.
    twin = build("mlp", "adam")
    twin.set_weights(model.get_weights())
    twin.optimizer.build(twin.trainable_variables)
    for mine, theirs in zip(twin.optimizer.variables, model.optimizer.variables):
        mine.assign(theirs)  # Adam's step count and moments
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    twin.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(twin.weights, model.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def test_model_compiled_for_xla_still_works_with_plain_keras_after_tfpipe_fit():
    """`jit_compile=True` is what Keras's default `jit_compile="auto"` becomes on any machine
    with a GPU. The variables stay on their stage devices after the fit, and one XLA program
    cannot read variables on several devices, so tfpipe says so and turns the flag off; the
    user's plain `predict` / `evaluate` / `fit` must then still work."""
    x, y = data("mlp", n=32)
    model = build("mlp", "adam", jit_compile=True)
    with pytest.warns(UserWarning, match=r"jit_compile=True.*4 devices.*now False"):
        tfpipe.fit(model, x, y, batch_size=8, stages=4, micro_batches=2, verbose=0)
    assert model.jit_compile is False
    assert model.predict(x, verbose=0).shape == (32, 3)
    assert np.isfinite(model.evaluate(x, y, verbose=0)[0])
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
