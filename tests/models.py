"""Small models and data shared by the tests, built deterministically from a seed."""

from __future__ import annotations

import keras
import numpy as np


@keras.saving.register_keras_serializable(package="tfpipe_tests")
class Scale(keras.layers.Layer):
    """A custom layer with its own weight: y = x * alpha."""

    def build(self, input_shape):
        self.alpha = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="alpha")

    def call(self, x):
        return x * self.alpha


def mlp() -> keras.Model:
    return keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(16, activation="tanh"),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(3, activation="softmax"),
    ], name="mlp")


def cnn() -> keras.Model:
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(6, 2, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ], name="cnn")


def functional() -> keras.Model:
    """Functional chain with a custom layer and a nested Sequential block."""
    inputs = keras.Input((8,), name="features")
    h = keras.layers.Dense(16, activation="relu", name="d1")(inputs)
    h = Scale(name="scale")(h)
    block = keras.Sequential([keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(16, activation="relu")], name="block")
    h = block(h)
    h = keras.layers.Dense(12, activation="tanh", name="d2")(h)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(h)
    return keras.Model(inputs, outputs, name="functional")


def deep() -> keras.Model:
    """Nine Dense layers: enough cut points for 4 devices x 2 interleaved chunks."""
    return keras.Sequential(
        [keras.Input((8,))]
        + [keras.layers.Dense(12, activation="tanh") for _ in range(8)]
        + [keras.layers.Dense(3, activation="softmax")],
        name="deep",
    )


MODELS = {"mlp": mlp, "cnn": cnn, "functional": functional, "deep": deep}
OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.01),
}


def build(kind: str, optimizer: str = "adam", seed: int = 0, **compile_kwargs) -> keras.Model:
    """A compiled model of `kind` whose initial weights depend only on `seed`."""
    keras.utils.set_random_seed(seed)
    model = MODELS[kind]()
    compile_kwargs.setdefault("loss", "sparse_categorical_crossentropy")
    compile_kwargs.setdefault("metrics", ["accuracy"])
    model.compile(optimizer=OPTIMIZERS[optimizer](), **compile_kwargs)
    return model


def data(kind: str, n: int = 64, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Inputs for `kind` and integer labels in [0, 3)."""
    rng = np.random.default_rng(seed)
    shape = (n, 8, 8, 1) if kind == "cnn" else (n, 8)  # every other kind reads 8 features
    return rng.normal(size=shape).astype("float32"), rng.integers(0, 3, size=n)


class StepLog(keras.callbacks.Callback):
    """Records the logs Keras reports after every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[dict[str, float]] = []
        self.index: list[int] = []  # the batch's index within its epoch

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append({k: float(v) for k, v in (logs or {}).items()})
        self.index.append(batch)


# Low-precision tolerances, in units of the compute dtype's machine epsilon (the spacing of
# numbers near 1: bfloat16 keeps 8 significant bits, float16 11). The pipeline sums M
# micro-batch gradients where Keras reduces one batch, and oneDNN (on or off by processor) may
# order sums differently again, so each result may differ by a few roundings of eps: rtol is
# 4 eps, atol eps / 2. A running accuracy may also differ by one sample: two top
# probabilities within rounding of each other order either way (`flips`).
EPS = {"mixed_bfloat16": 2.0**-7, "mixed_float16": 2.0**-10}


def low_precision_tolerance(policy: str) -> dict:
    """assert_same_training's rtol / atol / flips for a mixed-precision policy."""
    return {"rtol": 4 * EPS[policy], "atol": EPS[policy] / 2, "flips": 1}


def assert_same_training(ref_model, ref_log, model, log, rtol=1e-5, atol=1e-6, flips=0,
                         batch_size=16):
    """Per-step losses/metrics and final weights agree to float tolerance.

    `flips`: accuracy metrics may differ by that many samples out of those seen so far in the
    epoch (`batch_size` per batch).
    """
    assert len(ref_log.batches) == len(log.batches) > 0
    for a, b, index in zip(ref_log.batches, log.batches, log.index):
        assert a.keys() == b.keys()
        for k in a:
            tol = max(atol, flips / ((index + 1) * batch_size)) if "accuracy" in k else atol
            np.testing.assert_allclose(b[k], a[k], rtol=rtol, atol=tol, err_msg=k)
    for va, vb in zip(ref_model.weights, model.weights):
        np.testing.assert_allclose(vb.numpy(), va.numpy(), rtol=rtol, atol=atol, err_msg=va.path)
