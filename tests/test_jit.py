"""Per-stage XLA (`jit_compile`): each stage's forward and backward compiled on its own device,
training equal to `model.fit(jit_compile=True)`, a stage XLA refuses left uncompiled with one
warning, and a short last batch compiling once, not once per step.

Tolerances. `assert_same_training` (rtol 1e-5, atol 1e-6 on every step's loss and metrics and
on every weight) holds for all cases below against plain `model.fit(jit_compile=True)`, and
the whole model's relative weight difference, max |a - b| / (max |b| + 1e-6) over all weights
together, is at most 2e-7 (measured: MLP 1.8e-7, Transformer 1.2e-7, ResNet 5.9e-8; plain
`model.fit` with XLA against without: 1.6e-7, 1.2e-7, 1.8e-7), so the test asserts 1e-5.
Taken per variable the same ratio is large for a few variables whose exact gradient is zero
(attention's key bias, a convolution's bias under BatchNormalization): their values are
rounding noise, and plain `model.fit` with XLA against without already differs by 4.5e-4
(Transformer) and 2.4e-2 (ResNet) there, tfpipe against `model.fit` with XLA by at most 6.8e-4
and 1.5e-2, so that ratio is not asserted. With Adam instead of SGD that noise becomes steps of
the learning rate (Adam divides by the gradient's own scale): plain `model.fit` with XLA
against without then differs by 2.6 (relative, per variable) on the Transformer, hence SGD
for the Transformer and the ResNet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpipe
from benchmarks.common import transformer
from tests.models import StepLog, assert_same_training, build, data

ROOT = Path(__file__).resolve().parents[1]


def resnet() -> keras.Model:
    """Conv + BatchNormalization stem, two residual blocks (Add), pooling, a softmax head."""
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    h = keras.layers.Activation("relu", name="stem_relu")(
        keras.layers.BatchNormalization(name="stem_bn")(h))
    for b in range(2):
        r = keras.layers.Conv2D(8, 3, padding="same", name=f"block{b}_a")(h)
        r = keras.layers.Activation("relu", name=f"relu{b}_a")(
            keras.layers.BatchNormalization(name=f"bn{b}_a")(r))
        r = keras.layers.Conv2D(8, 3, padding="same", name=f"block{b}_b")(r)
        r = keras.layers.BatchNormalization(name=f"bn{b}_b")(r)
        h = keras.layers.Activation("relu", name=f"relu{b}")(keras.layers.Add(name=f"add{b}")([h, r]))
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    # named layers: an unnamed one would move Keras's name counters, which some tests'
    # expected messages (tests/error_cases.py) spell out
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(h),
                       name="resnet")


def make(kind: str, jit_compile: bool | str = "auto") -> keras.Model:
    """A compiled model of `kind`, its weights fixed by seed 0."""
    if kind == "mlp":
        return build("mlp", "adam", jit_compile=jit_compile)
    keras.utils.set_random_seed(0)
    if kind == "transformer":
        model = transformer(vocab=16, seq_len=8, dim=16, blocks=3)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        model, loss = resnet(), "sparse_categorical_crossentropy"
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss, jit_compile=jit_compile)
    return model


def xy(kind: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    if kind == "transformer":
        return (rng.integers(0, 16, (48, 8)).astype("int32"),
                rng.integers(0, 16, (48, 8)).astype("int32"))
    if kind == "resnet":
        return rng.normal(size=(48, 8, 8, 3)).astype("float32"), rng.integers(0, 3, 48)
    return data("mlp", n=48)


def relative_difference(model: keras.Model, ref: keras.Model) -> float:
    """max |a - b| / (max |b| + 1e-6) over all weights of the two models together."""
    a = np.concatenate([v.numpy().ravel() for v in model.weights])
    b = np.concatenate([v.numpy().ravel() for v in ref.weights])
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-6))


_REFERENCE: dict = {}


def reference(kind: str) -> tuple[keras.Model, StepLog]:
    """Plain `model.fit(jit_compile=True)` (cached per model kind)."""
    if kind not in _REFERENCE:
        model, log = make(kind, jit_compile=True), StepLog()
        x, y = xy(kind)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[log])
        _REFERENCE[kind] = (model, log)
    return _REFERENCE[kind]


@pytest.mark.parametrize("stages", [1, 4])
@pytest.mark.parametrize("kind", ["mlp", "transformer", "resnet"])
def test_fit_with_xla_equals_keras_with_xla(kind, stages):
    """BatchNormalization normalises each micro-batch by its own statistics, so the ResNet
    runs M = 1 (the batch whole) to equal `model.fit`; the others run M = 4."""
    ref, ref_log = reference(kind)
    model, log = make(kind), StepLog()
    x, y = xy(kind)
    history = tfpipe.fit(model, x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                         callbacks=[log], stages=stages, jit_compile=True,
                         micro_batches=1 if kind == "resnet" else 4)
    functions = history.pipeline.executor.runner.functions
    assert functions.compiled() == {(s, True): True for s in range(stages)}
    assert_same_training(ref, ref_log, model, log)
    assert relative_difference(model, ref) <= 1e-5


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_the_steady_loop_with_xla_equals_keras_with_xla(kind):
    """1F1B, K = 4, M = 8, the steady loop asked for (by default XLA runs unrolled): each
    stage's forward and backward marked `_XlaMustCompile`, called in the loops."""
    ref, ref_log = reference(kind)
    model, log = make(kind), StepLog()
    x, y = xy(kind)
    history = tfpipe.fit(model, x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                         callbacks=[log], stages=4, jit_compile=True, micro_batches=8,
                         schedule="1f1b", rank_loops="steady")
    loops = history.pipeline.executor.loops
    assert type(loops).__name__ == "SteadyLoop"
    region = loops.region.graph
    for pair in loops.pairs:
        assert pair.jit
        for fn in (pair.fw, pair.bw):
            name = fn.name.decode() if isinstance(fn.name, bytes) else fn.name
            assert region._get_function(name).cached_definition.attr["_XlaMustCompile"].b, name
    assert_same_training(ref, ref_log, model, log)
    assert relative_difference(model, ref) <= 1e-5


def traced_step(pipe: tfpipe.Pipeline, x: np.ndarray, y: np.ndarray) -> tf.Graph:
    with pipe._attached():  # noqa: SLF001 (tests only): the hooks fit installs
        step = tf.function(pipe.executor.train_step, autograph=False)
        return step.get_concrete_function((tf.constant(x), tf.constant(y))).graph


def test_each_stage_compiles_its_forward_and_backward_on_its_own_device():
    """In the traced step, every call of a stage's forward and of the gradient TensorFlow made
    for it names a function marked `_XlaMustCompile` and is placed on the stage's device. It
    runs there, too: the stage's variables are on that device, and an XLA program refuses a
    variable held on another device ('Trying to access resource ... located in device'), which
    is why `jit_compile=True` with `replicas` is refused (see `test_options.py`)."""
    x, y = data("mlp", n=32)
    pipe = tfpipe.Pipeline(build("mlp"), stages=4, micro_batches=2, jit_compile=True)
    graph = traced_step(pipe, x, y)
    attrs = {f.signature.name: f.attr for f in graph.as_graph_def().library.function}
    calls: dict[str, list[str]] = {st.device: [] for st in pipe.stages}
    for op in graph.get_operations():
        name = op.get_attr("f").name if op.type.endswith("PartitionedCall") else ""
        if "forward" in name:  # the stage functions (`StageFunctions._build`'s `forward`)
            assert attrs[name]["_XlaMustCompile"].b, name
            calls[op.device].append("forward" if name.startswith("__forward_") else "backward")
    for device, kinds in calls.items():  # one forward and one backward per micro-batch
        assert sorted(kinds) == ["backward"] * 2 + ["forward"] * 2, (device, kinds)
    assert len(calls) == 4
    pipe.fit(x, y, batch_size=16, epochs=1, verbose=0)  # and the compiled step runs


def stage_calls(graph: tf.Graph) -> list[str]:
    """The calls of stage functions (`StageFunctions._build`'s `forward`) in a traced step."""
    return [op.get_attr("f").name for op in graph.get_operations()
            if op.type.endswith("PartitionedCall") and "forward" in op.get_attr("f").name]


def test_a_step_keras_compiles_whole_traces_its_stage_inline():
    """One stage, one micro-batch: Keras compiles the whole step with XLA (as `model.fit`),
    and the stage's forward is traced into it, not called as a function (as a function, its
    gradient gave XLA another graph to fuse: 0.97 of `model.fit`'s throughput against 1.03
    inline, docs/benchmarks.md). With two micro-batches the stage is a function again."""
    x, y = data("mlp", n=32)
    whole = tfpipe.Pipeline(build("mlp"), stages=1, micro_batches=1, jit_compile=True)
    assert whole.whole_step_xla
    assert stage_calls(traced_step(whole, x, y)) == []
    split = tfpipe.Pipeline(build("mlp"), stages=1, micro_batches=2, jit_compile=True)
    assert not split.whole_step_xla
    assert len(stage_calls(traced_step(split, x, y))) == 4  # 2 forwards, 2 gradients


@keras.saving.register_keras_serializable(package="tfpipe_tests")
class NumpyDouble(keras.layers.Layer):
    """y = 2x through `tf.numpy_function`, which has no XLA kernel (with its own gradient)."""

    def call(self, x):
        @tf.custom_gradient
        def double(t):
            out = tf.numpy_function(lambda a: (2 * a).astype("float32"), [t], tf.float32,
                                    stateful=False)
            return tf.ensure_shape(out, t.shape), lambda dy: 2 * dy

        return double(x)


def numpy_model(jit_compile: bool | str = "auto") -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="d0"),
                              keras.layers.Dense(16, name="d1"), NumpyDouble(name="numpy_double"),
                              keras.layers.Dense(16, name="d2"), keras.layers.Dense(3, name="head")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit_compile,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def fit_numpy_model(**pipeline):
    """`model.fit` without XLA and `tfpipe.fit(jit_compile=True, **pipeline)` of
    `numpy_model`; checks they train alike and returns the pipeline and its one XLA
    warning."""
    x, y = data("mlp", n=48)
    ref, ref_log = numpy_model(jit_compile=False), StepLog()
    ref.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = numpy_model(), StepLog()
    with pytest.warns(UserWarning) as caught:
        history = tfpipe.fit(model, x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                             callbacks=[log], jit_compile=True, **pipeline)
    mine = [str(w.message) for w in caught if "jit_compile" in str(w.message)]
    assert len(mine) == 1, mine
    assert_same_training(ref, ref_log, model, log)
    return history.pipeline, mine[0]


def test_stage_xla_cannot_compile_runs_without_it_and_the_others_stay_compiled():
    pipe, warning = fit_numpy_model(balance=[1, 2, 2], micro_batches=2)
    assert "XLA cannot compile stage 1 (d1, numpy_double)" in warning
    assert "PyFunc" in warning and "the other stages stay compiled" in warning
    functions = pipe.executor.runner.functions
    assert functions.compiled() == {(0, True): True, (1, True): False, (2, True): True}
    assert list(functions.refused) == [1]


def test_in_the_steady_loop_a_stage_xla_cannot_compile_runs_without_it():
    pipe, warning = fit_numpy_model(balance=[1, 2, 2], micro_batches=4, schedule="1f1b",
                                    rank_loops="steady")
    assert "XLA cannot compile stage 1 (d1, numpy_double)" in warning
    assert type(pipe.executor.loops).__name__ == "SteadyLoop"
    assert [pair.jit for pair in pipe.executor.loops.pairs] == [True, False, True]
    assert list(pipe.executor.runner.functions.refused) == [1]


def test_a_whole_step_xla_cannot_compile_is_compiled_by_stage_with_one_warning(monkeypatch):
    """One device, one micro-batch: Keras would compile the whole step, and a stage XLA
    cannot lower failed its first step with TensorFlow's error. The stages are lowered
    before Keras builds the step: the step is then compiled stage by stage, that stage
    without XLA, one warning naming it, and training equals plain Keras."""
    from tfpipe.executor import stagefn

    probed = []
    refusal = stagefn.xla_refusal
    monkeypatch.setattr(stagefn, "xla_refusal", lambda stage, training, *args: (
        probed.append((stage.index, training)), refusal(stage, training, *args))[1])
    pipe, warning = fit_numpy_model(stages=2, balance=[2, 3], micro_batches=1,
                                    devices=["/cpu:0", "/cpu:0"])
    assert probed == [(0, True), (1, True)], probed  # each lowered once, when built
    assert "XLA cannot compile stage 1 (numpy_double, d2, head)" in warning
    assert "PyFunc" in warning and "not compiled whole" in warning
    assert not pipe.whole_step_xla
    assert pipe.executor.runner.functions.compiled() == {(0, True): True, (1, True): False}


def test_stages_that_are_not_stage_functions_warn_once():
    with pytest.warns(UserWarning, match=r"stage 0 \(.*\); stage 1 .* without XLA: "
                                         r"check_numerics=True"):
        tfpipe.Pipeline(build("mlp"), stages=2, check_numerics=True, jit_compile=True)

    class Whole(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(3)

        def call(self, x):
            return self.d(x)

    model = Whole()
    model.compile("sgd", "mse")
    model(np.zeros((1, 8), "float32"))
    with pytest.warns(UserWarning, match=r"stage 0 .* without XLA: tfpipe calls subclassed"):
        tfpipe.Pipeline(model, stages=1, micro_batches=2, jit_compile=True)
    with warnings.catch_warnings():  # one micro-batch: Keras compiles the step, model and all
        warnings.simplefilter("error")
        assert tfpipe.Pipeline(model, stages=1, micro_batches=1, jit_compile=True).whole_step_xla


def test_auto_follows_the_models_own_jit_compile():
    """Keras's `compile(jit_compile="auto")` resolves to a bool (False on this CPU-only
    machine, True with a GPU); tfpipe's "auto" follows it, also after tfpipe turned the flag
    off on a model placed over several devices, until the model is compiled again."""
    assert tfpipe.Pipeline(build("mlp"), stages=2).jit_compile is False  # "auto" on a CPU
    model = build("mlp", jit_compile=True)
    with pytest.warns(UserWarning, match=r"jit_compile=True.*now False"):
        assert tfpipe.Pipeline(model, stages=2).jit_compile is True
    assert model.jit_compile is False  # plain Keras keeps working on the placed model
    assert tfpipe.Pipeline(model, stages=2).jit_compile is True  # still the user's setting
    assert tfpipe.Pipeline(model, stages=2, jit_compile=False).jit_compile is False
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", jit_compile=False)
    assert tfpipe.Pipeline(model, stages=2).jit_compile is False


_COUNT = """
import json, sys
from pathlib import Path
import keras
import tfpipe
tfpipe.configure_cpu_devices(4)
from tests.models import build, data

dump = Path(sys.argv[1])
modules = lambda: len(list(dump.glob("*.before_optimizations.txt")))
after: list = []
count = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: after.append(modules()))
x, y = data("mlp", n=70)  # batches of 16: 4 full, then 6 (micro-batches of 8, then of 3)
history = tfpipe.fit(build("mlp"), x, y, batch_size=16, epochs=2, verbose=0, stages=2,
                     micro_batches=2, jit_compile=True, callbacks=[count])
functions = history.pipeline.executor.runner.functions
print(json.dumps({"after_epoch": after, "traces": list(functions.tracing_counts().values()),
                  "names": sorted(p.name.split(".")[1] for p in
                                  dump.glob("*.before_optimizations.txt"))}))
"""


def test_a_short_last_batch_compiles_once_not_every_step(tmp_path):
    """Counts XLA's compilations honestly: XLA writes one module per compilation when told to
    dump them (`XLA_FLAGS=--xla_dump_to`, read once per process, so in a child process). 10
    steps over 2 epochs, the last of each epoch short: each stage's forward and backward is
    traced once and compiled once per micro-batch shape (8 and 3), all in the first epoch."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_dump_to={tmp_path}", "PYTHONPATH": str(ROOT),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", _COUNT, str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["traces"] == [1, 1]
    assert report["after_epoch"] == [8, 8], report  # 2 stages x (forward, backward) x 2 shapes
    forwards = [n for n in report["names"] if n.startswith("a_forward")]
    assert len(forwards) == 4 and len(set(forwards)) == 2, report["names"]
