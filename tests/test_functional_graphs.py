"""Real Functional graphs train exactly like plain Keras: skips across stages, several inputs and
outputs, tied weights, BatchNorm and Dropout per micro-batch, split points by name."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpipe
from tests.models import StepLog, assert_same_training
from tfpipe.placement import device_of


def residual_mlp() -> keras.Model:
    """A skip from the first layer jumps over every later stage to the last one."""
    inputs = keras.Input((8,), name="x")
    h0 = keras.layers.Dense(12, activation="tanh", name="d0")(inputs)
    h = keras.layers.Dense(12, activation="tanh", name="d1")(h0)
    h = keras.layers.Dense(12, activation="tanh", name="d2")(h)
    h = keras.layers.Add(name="res1")([h, h0])
    h = keras.layers.Dense(12, activation="tanh", name="d3")(h)
    h = keras.layers.Dense(12, activation="tanh", name="d4")(h)
    h = keras.layers.Concatenate(name="cat")([h, h0, inputs])  # skips from stage 0 and the input
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(h)
    return keras.Model(inputs, outputs, name="residual")


def unet() -> keras.Model:
    inputs = keras.Input((8, 8, 1))
    e1 = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="enc1")(inputs)
    p1 = keras.layers.MaxPooling2D(name="pool")(e1)
    e2 = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="enc2")(p1)
    u1 = keras.layers.UpSampling2D(name="up")(e2)
    c1 = keras.layers.Concatenate(name="skip")([u1, e1])
    d1 = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="dec1")(c1)
    f = keras.layers.GlobalAveragePooling2D(name="gap")(d1)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(f)
    return keras.Model(inputs, outputs, name="unet")


def two_inputs_two_outputs() -> keras.Model:
    """Tokens and a float mask input; the mask is used only by a late stage; two heads."""
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    mask = keras.Input((6,), name="mask")
    h = keras.layers.Embedding(20, 8, name="embed")(tokens)
    h = keras.layers.Dense(8, activation="relu", name="d1")(h)
    h = keras.layers.Dense(8, activation="relu", name="d2")(h)
    pooled = keras.layers.Dot(axes=1, name="masked_sum")([h, mask])
    cls = keras.layers.Dense(3, activation="softmax", name="cls")(pooled)
    early = keras.layers.GlobalAveragePooling1D(name="early_pool")(h)
    reg = keras.layers.Dense(1, name="reg")(early)
    return keras.Model({"tokens": tokens, "mask": mask}, {"cls": cls, "reg": reg}, name="two_heads")


def shared_layer() -> keras.Model:
    """One Dense layer called in the first and the last stage (tied weights)."""
    shared = keras.layers.Dense(8, activation="tanh", name="shared")
    inputs = keras.Input((8,))
    h = shared(inputs)
    h = keras.layers.Dense(8, activation="tanh", name="mid1")(h)
    h = keras.layers.Dense(8, activation="tanh", name="mid2")(h)
    h = shared(h)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(h)
    return keras.Model(inputs, outputs, name="tied")


def make(factory, opt="adam", seed=0, **compile_kwargs):
    keras.utils.set_random_seed(seed)
    model = factory()
    compile_kwargs.setdefault("loss", "sparse_categorical_crossentropy")
    compile_kwargs.setdefault("metrics", ["accuracy"])
    optimizer = keras.optimizers.Adam(0.01) if opt == "adam" else keras.optimizers.SGD(0.1)
    model.compile(optimizer=optimizer, **compile_kwargs)
    return model


def fit_both(factory, x, y, pipe_kwargs, compile_kwargs=None, opt="adam", epochs=2):
    compile_kwargs = compile_kwargs or {}
    ref, ref_log = make(factory, opt, **compile_kwargs), StepLog()
    ref.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = make(factory, opt, **compile_kwargs), StepLog()
    pipe = tfpipe.Pipeline(model, **pipe_kwargs)
    pipe.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, callbacks=[log])
    assert_same_training(ref, ref_log, model, log)
    return pipe, ref, model


RNG = np.random.default_rng(0)
X8 = RNG.normal(size=(64, 8)).astype("float32")
Y3 = RNG.integers(0, 3, size=64)


@pytest.mark.parametrize("schedule,stages,micro_batches", [
    ("gpipe", 4, 4), ("1f1b", 4, 8), ("zb-h1", 2, 4), ("interleaved", 2, 4), ("1f1b", 2, 1),
])
def test_skip_connections_across_stages(schedule, stages, micro_batches):
    pipe, _, _ = fit_both(residual_mlp, X8, Y3, dict(stages=stages, micro_batches=micro_batches,
                                                     schedule=schedule))
    last = pipe.stages[-1]
    # the skip from d0 and the model input reach the last stage directly
    assert any(t._keras_history.operation.name == "d0" for t in last.inputs) or len(pipe.stages) <= 2


def test_unet_skip_from_first_to_last_stage():
    x = RNG.normal(size=(64, 8, 8, 1)).astype("float32")
    pipe, _, _ = fit_both(unet, x, Y3, dict(split_points=["pool", "up", "skip"], micro_batches=4,
                                            schedule="1f1b"))
    assert [layer.name for layer in pipe.stages[0].layers] == ["enc1"]
    last_inputs = {t._keras_history.operation.name for t in pipe.stages[-1].inputs}
    assert last_inputs == {"up", "enc1"}  # the encoder skip goes from stage 0 straight to stage 3


def test_two_inputs_two_outputs_with_loss_weights_and_metrics():
    tokens = RNG.integers(0, 20, size=(64, 6)).astype("int32")
    mask = (RNG.uniform(size=(64, 6)) > 0.3).astype("float32")
    x = {"tokens": tokens, "mask": mask}
    y = {"cls": Y3, "reg": RNG.normal(size=(64, 1)).astype("float32")}
    compile_kwargs = dict(
        loss={"cls": "sparse_categorical_crossentropy", "reg": "mse"},
        loss_weights={"cls": 1.0, "reg": 0.5},
        metrics={"cls": ["accuracy"], "reg": ["mae"]},
    )
    pipe, ref, model = fit_both(two_inputs_two_outputs, x, y,
                                dict(stages=3, micro_batches=4, schedule="gpipe"), compile_kwargs)
    mask_users = [s.index for s in pipe.stages
                  if any(t._keras_history.operation.name == "mask" for t in s.inputs)]
    assert mask_users and mask_users[0] > 0  # the second input goes straight to a later stage
    np.testing.assert_allclose(pipe.evaluate(x, y, verbose=0), ref.evaluate(x, y, verbose=0),
                               rtol=1e-5)
    pred, ref_pred = pipe.predict(x, verbose=0), ref.predict(x, verbose=0)
    for k in ("cls", "reg"):
        np.testing.assert_allclose(pred[k], ref_pred[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["gpipe", "zb-h1"])
def test_shared_layer_in_two_stages_sums_gradients(schedule):
    pipe, _, model = fit_both(shared_layer, X8, Y3,
                              dict(balance=[1, 2, 2], micro_batches=2, schedule=schedule))
    shared = model.get_layer("shared")
    users = [s.index for s in pipe.stages if shared in s.layers]
    assert users == [0, 2]
    assert device_of(shared.kernel) == pipe.stages[0].device  # one copy, on the first user
    assert len({id(v) for v in model.trainable_variables}) == len(model.trainable_variables)


def test_tied_embedding_as_output_projection():
    @keras.saving.register_keras_serializable(package="tfpipe_tests")
    class TiedLogits(keras.layers.Layer):
        def __init__(self, embedding, **kwargs):
            super().__init__(**kwargs)
            self.embedding = embedding

        def call(self, h):
            return keras.ops.matmul(h, keras.ops.transpose(self.embedding.embeddings))

    def tied_lm():
        tokens = keras.Input((5,), dtype="int32")
        embed = keras.layers.Embedding(12, 6, name="embed")
        h = embed(tokens)
        h = keras.layers.Dense(6, activation="tanh", name="d1")(h)
        h = keras.layers.Dense(6, activation="tanh", name="d2")(h)
        logits = TiedLogits(embed, name="tied_logits")(h)
        return keras.Model(tokens, logits, name="tied_lm")

    x = RNG.integers(0, 12, size=(64, 5)).astype("int32")
    y = RNG.integers(0, 12, size=(64, 5))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    pipe, _, model = fit_both(tied_lm, x, y, dict(stages=3, micro_batches=4),
                              dict(loss=loss, metrics=[]))
    table = model.get_layer("embed").embeddings
    assert device_of(table) == pipe.stages[0].device
    # the tied table counts once, on the stage that holds it
    assert sum(s.num_params for s in pipe.stages) == model.count_params()
    assert pipe.stages[-1].shared_from == {id(table): 0}
    assert pipe.stages[-1].layers[-1].name == "tied_logits"


def micro_batch_reference(model, x, y, micro_batches, steps_of=16, epochs=1):
    """Plain Keras on one device: per-micro-batch forward (training=True), summed gradients,
    one optimizer step per batch. This is what a pipeline computes, layer for layer."""
    loss_fn = model.loss if callable(model.loss) else keras.losses.get(model.loss)
    for _ in range(epochs):
        for start in range(0, len(x), steps_of):
            xb, yb = x[start:start + steps_of], y[start:start + steps_of]
            grads = None
            for xm, ym in zip(np.array_split(xb, micro_batches), np.array_split(yb, micro_batches)):
                with tf.GradientTape() as tape:
                    loss = keras.ops.mean(loss_fn(ym, model(xm, training=True))) * (len(xm) / len(xb))
                g = tape.gradient(loss, model.trainable_variables)
                grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            model.optimizer.apply_gradients(zip(grads, model.trainable_variables))


@pytest.mark.parametrize("layer", ["batchnorm", "dropout"])
def test_batchnorm_and_dropout_per_micro_batch(layer):
    def model_fn():
        extra = (keras.layers.BatchNormalization(name="bn") if layer == "batchnorm"
                 else keras.layers.Dropout(0.3, name="drop"))
        return keras.Sequential([
            keras.Input((8,)), keras.layers.Dense(12, activation="relu"), extra,
            keras.layers.Dense(12, activation="relu"), keras.layers.Dense(3, activation="softmax"),
        ], name=layer)

    ref = make(model_fn, "sgd", metrics=[])
    micro_batch_reference(ref, X8, Y3, micro_batches=4, epochs=2)
    model = make(model_fn, "sgd", metrics=[])
    tfpipe.fit(model, X8, Y3, batch_size=16, epochs=2, stages=3, micro_batches=4, shuffle=False,
               verbose=0)
    for a, b in zip(ref.weights, model.weights):  # includes BatchNorm's moving statistics
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    if layer == "batchnorm":
        assert not np.allclose(model.get_layer("bn").moving_mean.numpy(), 0.0)


def test_split_points_by_name():
    model = make(residual_mlp)
    pipe = tfpipe.Pipeline(model, split_points=["d2", "d4"])
    assert [s.layers[0].name for s in pipe.stages] == ["d0", "d2", "d4"]
    with pytest.raises(tfpipe.PipelineError, match=r"split_points names layer 'nope'.*its layer calls are: d0, d1"):
        tfpipe.Pipeline(make(residual_mlp), split_points=["nope"])
    with pytest.raises(tfpipe.PipelineError, match=r"distinct layers in model order"):
        tfpipe.Pipeline(make(residual_mlp), split_points=["d4", "d2"])


def frozen_argmax_router() -> keras.Model:
    """Stage 0 (frozen) sends stage 1 only int ids (an argmax) plus nothing float."""
    inputs = keras.Input((8,))
    scores = keras.layers.Dense(4, name="scores", trainable=False)(inputs)
    ids = keras.ops.argmax(scores, axis=-1)
    h = keras.layers.Embedding(4, 6, name="embed")(ids)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(h)
    return keras.Model(inputs, outputs, name="router")


def test_integer_tensor_between_stages_trains_like_keras_when_upstream_is_frozen():
    """An int boundary is fine when nothing upstream trains (else: the catalogued error)."""
    pipe, _, model = fit_both(frozen_argmax_router, X8, Y3,
                              dict(split_points=["embed"], micro_batches=4), opt="sgd")
    (sent,) = pipe.stages[0].outputs
    assert "int" in sent.dtype
    assert device_of(model.get_layer("embed").embeddings) != device_of(model.get_layer("scores").kernel)


def test_a_layer_reading_one_tensor_twice_is_one_call_each():
    """Self-attention reads its input as query and value: each layer call is read once.

    Kahn's order used to queue such a call once per repeated parent, and every call after it
    doubled: 40, 196, 820 calls for 2, 4, 6 blocks of 7 layers (57,332 at 12 blocks, where
    balancing took minutes). Now the calls are the model's own.
    """
    from tfpipe.partition.graph import read_graph

    inputs = keras.Input((8,), dtype="int32")
    h = keras.layers.Embedding(16, 8)(inputs)
    for _ in range(6):
        n = keras.layers.LayerNormalization()(h)
        h = keras.layers.Add()([h, keras.layers.MultiHeadAttention(2, 4)(n, n)])
        h = keras.layers.Add()([h, keras.layers.Dense(8)(keras.layers.LayerNormalization()(h))])
        h = keras.layers.Add()([h, h])  # one tensor, both inputs
    model = keras.Model(inputs, h)
    calls = read_graph(model).calls
    assert len(calls) == len(model.operations) - 1  # all but the InputLayer
    assert len({id(c.node) for c in calls}) == len(calls)
