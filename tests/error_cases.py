"""The catalogue of bad inputs: each case, the error it must raise, and the fix the message gives.

`python -m tests.error_cases > docs/errors.md` writes the user-facing list from the real
messages; `tests/test_error_catalog.py` checks every case and that the docs list them all.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import tfpipe
from tests.models import build, data
from tfpipe.schedules import Schedule


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[], Any]
    error: type[BaseException] | tuple[type[BaseException], ...]
    pattern: str
    after_placement: bool = False  # raised by fit, after the pipeline placed the model


BUILT: list[tuple[keras.Model, list[np.ndarray]]] = []


def tracked(model: keras.Model) -> keras.Model:
    """Remembers a model a case builds, with its weights, so the test can check them after."""
    BUILT.append((model, [v.numpy().copy() for v in model.weights]))
    return model


def mlp():
    return tracked(build("mlp"))


def xy(n=64):
    return data("mlp", n=n)


def fit(model, x=None, **kwargs):
    x, y = (xy()[0] if x is None else x), xy()[1]
    kwargs.setdefault("batch_size", 16)
    return tfpipe.fit(model, x, y, verbose=0, **kwargs)


def nan_model():
    """The log of a negative number in layer 'log_layer': NaN in the first forward."""
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, name="d0"),
                              keras.layers.Lambda(lambda t: keras.ops.log(t - 100.0), name="log_layer"),
                              keras.layers.Dense(3, name="head")])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return tracked(model)


def huge_allocation():
    """Layer 'huge' asks for a 1 PiB tensor: the CPU allocator's ResourceExhaustedError (more than
    any address space holds, so it fails whatever the kernel's overcommit policy). One stage on
    one device: in a step that spans devices, TensorFlow reports the other devices' cancelled
    receives ("RecvAsync is cancelled", a CancelledError) in place of the allocator's error."""
    big = (2**24, 2**24)
    model = keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(8, name="d0"),
        keras.layers.Lambda(lambda t: t + keras.ops.sum(keras.ops.broadcast_to(t[:1, :1], big)),
                            name="huge"),
        keras.layers.Dense(3, name="head")])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return tracked(model)


def uncompiled():
    return tracked(keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)]))


def no_loss():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    model.compile("sgd")
    return model


def mixed_reductions():
    inputs = keras.Input((8,))
    a = keras.layers.Dense(1, name="a")(inputs)
    b = keras.layers.Dense(1, name="b")(inputs)
    model = keras.Model(inputs, {"a": a, "b": b})
    model.compile("sgd", loss={"a": keras.losses.MeanSquaredError(reduction="sum"),
                               "b": keras.losses.MeanSquaredError()})
    return model


def opaque():
    class Opaque(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(3)

        def call(self, x):
            return self.d(x)

    model = Opaque()
    model.compile("sgd", "mse")
    model(np.zeros((1, 8), "float32"))
    return model


def two_inputs():
    a, b = keras.Input((8,), name="left"), keras.Input((8,), name="right")
    out = keras.layers.Dense(3, name="head")(keras.layers.Concatenate()([a, b]))
    model = keras.Model([a, b], out)
    model.compile("sgd", "sparse_categorical_crossentropy")
    return tracked(model)


def identity_model():
    inputs = keras.Input((8,))
    model = keras.Model(inputs, inputs)
    model.compile("sgd", "mse")
    return model


def weightless_middle():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8), keras.layers.Activation("relu"),
                              keras.layers.Dense(3)])
    model.compile("sgd", "sparse_categorical_crossentropy")
    return model


def subclassed(kind: str):
    """A subclassed model whose call() cannot be traced into stages, as `kind` says."""

    class Branchy(keras.Model):  # Python control flow on a tensor's value
        def __init__(self):
            super().__init__()
            self.d1, self.d2 = keras.layers.Dense(8), keras.layers.Dense(3)

        def call(self, x):
            h = self.d1(x)
            return self.d2(h) if keras.ops.mean(h) > 0 else self.d2(-h)

    class OwnWeight(keras.Model):  # a weight made by the model, not by a layer
        def __init__(self):
            super().__init__()
            self.d1, self.d2 = keras.layers.Dense(8), keras.layers.Dense(3)
            self.scale = self.add_weight(shape=(8,), initializer="ones", name="scale")

        def call(self, x):
            return self.d2(self.d1(x) * self.scale)

    class ConstantPositions(keras.Model):  # a layer called on positions, not on the inputs
        def __init__(self):
            super().__init__()
            self.tok = keras.layers.Embedding(10, 4, name="tok")
            self.pos = keras.layers.Embedding(6, 4, name="pos")
            self.head = keras.layers.Dense(10, name="head")

        def call(self, ids):
            return self.head(self.tok(ids) + self.pos(keras.ops.arange(6)))

    model = {"branchy": Branchy, "own_weight": OwnWeight, "positions": ConstantPositions}[kind]()
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    sample = np.zeros((2, 6), "int32") if kind == "positions" else np.zeros((2, 8), "float32")
    model(sample)
    tracked(model)
    return tfpipe.Pipeline(model, stages=2, sample=sample)


def nested_twice():
    """Two nested models, each with a layer named 'dense_a'."""
    def part(name):
        inputs = keras.Input((8,))
        return keras.Model(inputs, keras.layers.Dense(8, name="dense_a")(inputs), name=name)

    inputs = keras.Input((8,))
    out = keras.layers.Dense(3, name="head")(part("right")(part("left")(inputs)))
    model = keras.Model(inputs, out)
    model.compile("sgd", "mse")
    return tracked(model)


def argmax_cut():
    """Stage 0 sends stage 1 only the argmax of its Dense: an int32 tensor."""
    keras.backend.clear_session()  # Keras names the op argmax_<n> after other tests' argmaxes
    inputs = keras.Input((8,))
    scores = keras.layers.Dense(4, name="scores")(inputs)
    ids = keras.ops.argmax(scores, axis=-1)
    out = keras.layers.Dense(3, name="head")(keras.layers.Embedding(4, 4, name="embed")(ids))
    model = keras.Model(inputs, out)
    model.compile("sgd", "sparse_categorical_crossentropy")
    return tracked(model)


def quantised_cut():
    """As `argmax_cut`, through a Lambda layer, which declares float32 but returns int32."""
    inputs = keras.Input((8,))
    h = keras.layers.Dense(4, name="d0")(inputs)
    q = keras.layers.Lambda(lambda t: keras.ops.cast(keras.ops.round(3 * t), "int32"), name="quant")(h)
    f = keras.layers.Lambda(lambda t: keras.ops.cast(t, "float32"), name="back")(q)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(f))
    model.compile("sgd", "sparse_categorical_crossentropy")
    return tracked(model)


def text_dataset():
    x, y = xy()
    return tf.data.Dataset.from_tensor_slices((x.astype(str), y)).batch(16)


BAD = Schedule.from_text(["F0 B0 F1 B1", "F1 F0 B0 B1"], name="mine")

CASES = [
    Case("not a Keras model", lambda: tfpipe.Pipeline("model"), tfpipe.PipelineError,
         r"needs a keras.Model, got str"),
    Case("model not compiled, then fit", lambda: fit(uncompiled(), stages=1),
         tfpipe.PipelineError, r"not compiled: call model.compile.*before fit", after_placement=True),
    Case("model compiled without a loss", lambda: tfpipe.Pipeline(no_loss(), stages=1),
         tfpipe.PipelineError, r"compiled without a loss: pass loss="),
    Case("losses with different reductions", lambda: tfpipe.Pipeline(mixed_reductions(), stages=1),
         tfpipe.PipelineError, r"reduction\(s\) \['sum', 'sum_over_batch_size'\].*Use one reduction"),
    Case("model not built", lambda: tfpipe.Pipeline(_unbuilt(), stages=1), tfpipe.PipelineError,
         r"not built: start it with keras.Input"),
    Case("subclassed model split without a sample", lambda: tfpipe.Pipeline(opaque(), stages=2),
         tfpipe.PipelineError, r"splits subclassed model 'opaque(_\d+)?' \(Opaque\) by tracing its call\(\).*pass sample=<a batch of inputs>.*stages=1"),
    Case("subclassed call() branching on a tensor's value", lambda: subclassed("branchy"),
         tfpipe.PipelineError, r"cannot split subclassed model '.*' \(Branchy\): tracing its call\(\) on symbolic inputs failed.*keras.ops.cond.*stages=1"),
    Case("subclassed model with a weight of its own", lambda: subclassed("own_weight"),
         tfpipe.PipelineError, r"\(OwnWeight\) has weights that no layer of its call\(\) holds: \['.*scale'\].*move it into a layer"),
    Case("subclassed model calling a layer on constants", lambda: subclassed("positions"),
         tfpipe.PipelineError, r"\(ConstantPositions\) calls layer\(s\) \['pos'\] in call\(\) on values that do not come from its inputs.*would never train.*PositionEmbedding"),
    Case("split point ambiguous across nested models", lambda: tfpipe.Pipeline(nested_twice(), split_points=["dense_a"]),
         tfpipe.PipelineError, r"split_points names layer 'dense_a', which model '.*' calls in several nested models: left/dense_a, right/dense_a. Give the full path."),
    Case("model with no layers", lambda: tfpipe.Pipeline(identity_model(), stages=2),
         tfpipe.PipelineError, r"has no layers to split"),
    Case("stages not a positive integer", lambda: tfpipe.Pipeline(mlp(), stages=0),
         tfpipe.PipelineError, r"stages must be a positive integer, got 0"),
    Case("more stages than layers", lambda: tfpipe.Pipeline(mlp(), stages=5, devices=["/cpu:0"]),
         tfpipe.PipelineError, r"stages=5 is more than the 4 layer calls.*use stages <= 4"),
    Case("balance not summing to the layer count", lambda: tfpipe.Pipeline(mlp(), balance=[1, 2]),
         tfpipe.PipelineError, r"balance=\[1, 2\] must be positive layer counts summing to .* 4 layer calls"),
    Case("balance with a zero entry", lambda: tfpipe.Pipeline(mlp(), balance=[0, 4]),
         tfpipe.PipelineError, r"balance=\[0, 4\] must be positive"),
    Case("stages and balance disagree", lambda: tfpipe.Pipeline(mlp(), stages=3, balance=[2, 2]),
         tfpipe.PipelineError, r"stages=3 with chunks=1 makes 3 stages, but balance/split_points give 2"),
    Case("unknown balance mode", lambda: tfpipe.Pipeline(mlp(), stages=2, balance="flops"),
         tfpipe.PipelineError, r"balance='flops': use 'params', 'time', 'memory'"),
    Case("balance by time without a sample", lambda: tfpipe.Pipeline(mlp(), stages=2, balance="time"),
         tfpipe.PipelineError, r"balance='time' profiles each layer on a sample batch: pass sample="),
    Case("split point that names no layer", lambda: tfpipe.Pipeline(mlp(), split_points=["dense_9"]),
         tfpipe.PipelineError, r"split_points names layer 'dense_9'.*its layer calls are"),
    Case("split points out of order", lambda: _split_out_of_order(), tfpipe.PipelineError,
         r"must name distinct layers in model order"),
    Case("split points and balance together", lambda: tfpipe.Pipeline(mlp(), balance=[2, 2], split_points=["x"]),
         tfpipe.PipelineError, r"Give balance=\[...\] or split_points=\[...\], not both"),
    Case("fewer visible devices than stages", lambda: tfpipe.Pipeline(_deep(), stages=8),
         tfpipe.PipelineError, r"stages=8 needs 8 devices but only 4 are visible.*configure_cpu_devices\(8\)"),
    Case("device that does not exist", lambda: tfpipe.Pipeline(mlp(), stages=2, devices=["/cpu:0", "/gpu:7"]),
         tfpipe.PipelineError, r"Device '/gpu:7' does not exist; visible devices are"),
    Case("devices given as one string", lambda: tfpipe.Pipeline(mlp(), stages=2, devices="/cpu:0"),
         tfpipe.PipelineError, r"devices must be a non-empty list of device names, got '/cpu:0'"),
    Case("logical devices requested after TensorFlow initialised",
         lambda: (tf.constant(0), tfpipe.configure_cpu_devices(6)), tfpipe.DeviceConfigurationError,
         r"configure_cpu_devices\(6\) was called after TensorFlow initialised with 4"),
    Case("logical device count not positive", lambda: tfpipe.configure_cpu_devices(0),
         tfpipe.PipelineError, r"configure_cpu_devices needs a positive integer, got 0"),
    Case("micro-batch count not positive", lambda: tfpipe.Pipeline(mlp(), stages=2, micro_batches=0),
         tfpipe.PipelineError, r"micro_batches must be a positive integer .* got 0"),
    Case("batch smaller than the micro-batch count", lambda: fit(mlp(), stages=2, micro_batches=32),
         tfpipe.PipelineError, r"a batch of 16 samples is smaller than micro_batches=32", after_placement=True),
    Case("dataset batch smaller than the micro-batch count (found while the step runs)",
         lambda: tfpipe.fit(mlp(), tf.data.Dataset.from_tensor_slices(xy(n=8)).batch(4), stages=2, micro_batches=8, verbose=0),
         tfpipe.PipelineError, r"^tfpipe: a batch of 4 samples is smaller than micro_batches=8; use a batch size", after_placement=True),
    Case("NaN in a layer's forward with check_numerics=True (found while the step runs)",
         lambda: fit(nan_model(), balance=[1, 2], micro_batches=2, check_numerics=True),
         tfpipe.PipelineError, r"^tfpipe check_numerics: NaN or Inf in the forward of layer 'log_layer' \(stage 1, micro-batch 0\)", after_placement=True),
    Case("a stage's device out of memory (found while the step runs)",
         lambda: fit(huge_allocation(), stages=1, micro_batches=2),
         tfpipe.WorkerOutOfMemoryError, r"^Device /job:localhost/replica:0/task:0/device:CPU:0 \(pipeline stage 0\) ran out of memory: OOM when allocating tensor with shape\[16777216,16777216\].*schedule='1f1b'.*recompute=.*memory_budget=", after_placement=True),
    Case("unknown schedule name", lambda: tfpipe.Pipeline(mlp(), stages=2, schedule="pipedream"),
         ValueError, r"Unknown schedule 'pipedream': use one of"),
    Case("invalid user-made schedule (prints the grid)", lambda: tfpipe.Pipeline(mlp(), micro_batches=2, schedule=BAD),
         ValueError, r"(?s)Schedule 'mine'.*rank0.*rank1"),
    Case("user-made schedule of another size", lambda: tfpipe.Pipeline(mlp(), micro_batches=4, schedule=Schedule.from_text(["F0 B0", "F0 B0"], name="small")),
         ValueError, r"Schedule 'small' is for 2 stages x 1 micro-batches, but the pipeline has 2 stages x 4"),
    Case("chunks without the interleaved schedule", lambda: tfpipe.Pipeline(mlp(), stages=2, chunks=2),
         tfpipe.PipelineError, r"chunks=2 needs schedule='interleaved'"),
    Case("interleaved model too small for stages x chunks", lambda: tfpipe.Pipeline(mlp(), stages=4, schedule="interleaved"),
         tfpipe.PipelineError, r"stages=8 is more than the 4 layer calls"),
    Case("unknown recompute mode", lambda: tfpipe.Pipeline(mlp(), stages=2, recompute="sometimes"),
         tfpipe.PipelineError, r"recompute='sometimes': use 'never', 'except_last', 'always'"),
    Case("recompute list of the wrong length", lambda: tfpipe.Pipeline(mlp(), stages=2, recompute=[True]),
         tfpipe.PipelineError, r"recompute=\[True\] has 1 entries for 2 stages"),
    Case("recompute on a stage without trainable weights", lambda: tfpipe.Pipeline(weightless_middle(), balance=[1, 1, 1], recompute=[False, True, False]),
         tfpipe.PipelineError, r"recompute asks stage 1 \(activation\).*no trainable weights.*Set entry 1 to False"),
    Case("data without targets", lambda: tfpipe.fit(mlp(), xy()[0], batch_size=16, stages=2, verbose=0),
         tfpipe.PipelineError, r"The data gives inputs but no targets.*\(x, y\)", after_placement=True),
    Case("dict inputs missing a model input", lambda: tfpipe.fit(two_inputs(), {"left": xy()[0]}, xy()[1], batch_size=16, stages=1, verbose=0),
         (tfpipe.PipelineError, ValueError, KeyError), r"right", after_placement=True),
    Case("wrong number of inputs", lambda: tfpipe.fit(two_inputs(), (xy()[0],), xy()[1], batch_size=16, stages=2, verbose=0),
         (tfpipe.PipelineError, ValueError), r"takes 2 input\(s\) \['left', 'right'\], but each data element gives 1|expects 2 input", after_placement=True),
    Case("labels of the wrong shape", lambda: tfpipe.fit(mlp(), xy()[0], np.zeros((64, 5, 2)), batch_size=16, stages=2, verbose=0),
         (ValueError, tf.errors.InvalidArgumentError), r"shape|Shape", after_placement=True),
    Case("text arrays into a numeric input", lambda: fit(mlp(), stages=2, x=xy()[0].astype(str)),
         tfpipe.PipelineError, r"input '.*' takes float32 values, but the data gives str\d+ for it: cast or encode", after_placement=True),
    Case("dataset of text into a numeric input", lambda: tfpipe.fit(mlp(), text_dataset(), stages=2, verbose=0),
         tfpipe.PipelineError, r"input '.*' takes float32 values, but the data gives string for it", after_placement=True),
    Case("stage sending only non-float tensors (no gradient path)", lambda: tfpipe.Pipeline(argmax_cut(), split_points=["embed"]),
         tfpipe.PipelineError, r"Stage 0 \(scores, argmax\) has trainable weights \['scores/kernel', 'scores/bias'\] but sends the next stages only non-float tensors: argmax \(int(32|64)\).*cut the model elsewhere"),
    Case("non-float stage output hidden in a Lambda layer", lambda: fit(quantised_cut(), split_points=["back"]),
         tfpipe.PipelineError, r"Stage 0 \(d0, quant\) .* non-float tensors: quant \(int32\)", after_placement=True),
    Case("unknown batch_norm mode", lambda: tfpipe.Pipeline(mlp(), stages=2, batch_norm="full"),
         tfpipe.PipelineError, r"batch_norm='full': use 'micro-batch' .* or 'deferred'"),
    Case("deferred batch norm with replicas", lambda: tfpipe.Pipeline(mlp(), stages=2, replicas=2, batch_norm="deferred"),
         tfpipe.PipelineError, r"batch_norm='deferred' with replicas=2.*Use replicas=1, or batch_norm='micro-batch'"),
    Case("jit_compile not 'auto', True or False", lambda: tfpipe.Pipeline(mlp(), stages=2, jit_compile="xla"),
         tfpipe.PipelineError, r"jit_compile='xla': use 'auto' .* True .* or False"),
    Case("jit_compile=True with replicas", lambda: tfpipe.Pipeline(mlp(), stages=2, replicas=2, jit_compile=True),
         tfpipe.PipelineError, r"jit_compile=True with replicas=2: .*XLA program cannot read a variable held on another device.*Use replicas=1, or jit_compile=False"),
    Case("replicas without one device per stage per copy", lambda: tfpipe.Pipeline(mlp(), stages=2, replicas=2, devices=["/cpu:0", "/cpu:1", "/cpu:2"]),
         tfpipe.PipelineError, r"replicas=2 copies of a 2-device pipeline need 4 devices.*Give 4 devices"),
    Case("timeline without profiling", lambda: tfpipe.Pipeline(mlp(), stages=2).timeline(),
         ValueError, r"No timeline: build the Pipeline with profile=True", after_placement=True),
    Case("the steady loop on a schedule without a steady phase", lambda: tfpipe.Pipeline(mlp(), stages=2, micro_batches=4, schedule="gpipe", rank_loops="steady"),
         tfpipe.PipelineError, r"gpipe has no steady phase one loop can carry(.|\n)*rank0  F0"),
]


def _unbuilt():
    model = keras.Sequential([keras.layers.Dense(3)])
    model.compile("sgd", "mse")
    return model


def _deep():
    return tracked(build("deep"))


def _split_out_of_order():
    model = tracked(build("mlp"))
    names = [layer.name for layer in model.layers]
    return tfpipe.Pipeline(model, split_points=[names[3], names[1]])


def message_of(case: Case) -> str:
    try:
        case.run()
    except case.error as err:
        return str(err)
    raise AssertionError(f"{case.name}: no error raised")


def markdown() -> str:
    lines = [
        "# Errors",
        "",
        "Every bad input tfpipe knows of, and the message a user sees (from a real run of",
        "`tests/error_cases.py`; regenerate with `python -m tests.error_cases > docs/errors.md`).",
        "Configuration errors are raised before any variable moves, so the model is left as it was.",
        "",
    ]
    for n, case in enumerate(CASES, 1):
        text = message_of(case)
        text = re.sub(r"\n\s*\[\[.*", "", text, flags=re.S)
        if "Graph execution error" in text:
            text = text[text.rfind("INVALID_ARGUMENT"):].split("\n")[0]
        text = text.strip()
        if len(text) > 1200:
            text = text[:1200] + " ..."
        kind = case.error.__name__ if isinstance(case.error, type) else case.error[0].__name__
        lines += [f"## {n}. {case.name}", "", f"`{kind}`", "", "```text", text, "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    tfpipe.configure_cpu_devices(4)
    print(markdown())
