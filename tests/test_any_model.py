"""Any Keras model splits and trains exactly like `model.fit`: nested models (read through, cut
inside), a nested model called twice, transfer learning on a frozen `keras.applications` base,
and subclassed models (their `call` traced over their own layers)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tfpipe
from tests.models import StepLog, assert_same_training
from tfpipe.placement import device_of

RNG = np.random.default_rng(0)
X8 = RNG.normal(size=(64, 8)).astype("float32")
Y3 = RNG.integers(0, 3, size=64)


def nested() -> keras.Model:
    """A Functional encoder holding a Sequential, inside a Functional model (depth 2)."""
    inner = keras.Sequential([keras.Input((12,)), keras.layers.Dense(12, activation="tanh", name="s1"),
                              keras.layers.Dense(12, activation="tanh", name="s2")], name="mlp")
    enc_in = keras.Input((8,))
    h = keras.layers.Dense(12, activation="tanh", name="a")(enc_in)
    encoder = keras.Model(enc_in, inner(h), name="encoder")
    inputs = keras.Input((8,))
    h = encoder(inputs)
    h = keras.layers.Dense(12, activation="tanh", name="b")(h)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(h))


def siamese() -> keras.Model:
    """One encoder model called on two inputs: its weights are used in two stages."""
    enc_in = keras.Input((8,))
    h = keras.layers.Dense(12, activation="tanh", name="e1")(enc_in)
    encoder = keras.Model(enc_in, keras.layers.Dense(6, activation="tanh", name="e2")(h),
                          name="encoder")
    left, right = keras.Input((8,), name="left"), keras.Input((8,), name="right")
    h = keras.layers.Concatenate(name="cat")([encoder(left), encoder(right)])
    h = keras.layers.Dense(8, activation="tanh", name="mix")(h)
    return keras.Model([left, right], keras.layers.Dense(3, activation="softmax", name="head")(h))


def make(factory, optimizer=None):
    keras.utils.set_random_seed(0)
    model = factory()
    model.compile(optimizer=optimizer or keras.optimizers.Adam(0.01),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def fit_both(factory, x, y, optimizer=None, epochs=2, **pipe_kwargs):
    ref, ref_log = make(factory, optimizer), StepLog()
    ref.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = make(factory, optimizer), StepLog()
    history = tfpipe.fit(model, x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
                         callbacks=[log], **pipe_kwargs)
    assert_same_training(ref, ref_log, model, log)
    return history.pipeline, ref, model


@pytest.mark.parametrize("schedule,stages,micro_batches", [("1f1b", 4, 4), ("zb-h1", 3, 2)])
def test_nested_models_are_cut_inside_and_train_like_fit(schedule, stages, micro_batches):
    pipe, _, model = fit_both(nested, X8, Y3, stages=stages, micro_batches=micro_batches,
                              schedule=schedule)
    names = [n for st in pipe.stages for n in st.names]
    assert names == ["encoder/a", "encoder/mlp/s1", "encoder/mlp/s2", "b", "head"]
    for st in pipe.stages:  # each weight sits on the stage that calls its layer
        for layer in st.layers:
            assert {device_of(v) for v in layer.weights} <= {st.device}, layer.name
    # the user's model keeps its own structure: 3 top-level layers, the nested models intact
    assert [layer.name for layer in model.layers[1:]] == ["encoder", "b", "head"]
    assert [layer.name for layer in model.get_layer("encoder").layers[1:]] == ["a", "mlp"]


def test_split_points_and_balance_count_the_calls_inside_nested_models():
    model = make(nested)
    by_path = tfpipe.Pipeline(model, split_points=["encoder/mlp/s2", "head"])
    assert [st.names for st in by_path.stages] == [
        ["encoder/a", "encoder/mlp/s1"], ["encoder/mlp/s2", "b"], ["head"]]
    model = make(nested)
    by_name = tfpipe.Pipeline(model, split_points=["s2"])  # a plain name, unambiguous
    assert [len(st.names) for st in by_name.stages] == [2, 3]
    model = make(nested)
    counted = tfpipe.Pipeline(model, balance=[1, 3, 1])
    assert counted.stages[1].names == ["encoder/mlp/s1", "encoder/mlp/s2", "b"]
    summary = counted.summary(print_fn=lambda _: None)
    assert "encoder/mlp/s1 .. b (3)" in summary
    assert "encoder/a (1)" in summary


def test_nested_model_called_twice_shares_its_weights_across_stages():
    x = {"left": X8, "right": X8[::-1].copy()}
    pipe, _, model = fit_both(siamese, x, Y3, balance=[2, 2, 3], micro_batches=4,
                              schedule="1f1b")
    assert [st.names for st in pipe.stages] == [
        ["encoder/e1", "encoder/e2"], ["encoder/e1", "encoder/e2"], ["cat", "mix", "head"]]
    kernel = model.get_layer("encoder").get_layer("e1").kernel
    assert pipe.stages[1].shared_from[id(kernel)] == 0  # one variable, held by its first user
    assert device_of(kernel) == pipe.stages[0].device


def transfer() -> keras.Model:
    """The most common Keras script: a frozen keras.applications base and a new head."""
    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                          include_top=False, weights=None)
    base.trainable = False
    return keras.Sequential([keras.Input((32, 32, 3)), base,
                             keras.layers.GlobalAveragePooling2D(name="pool"),
                             keras.layers.Dense(3, activation="softmax", name="head")])


def test_transfer_learning_on_a_frozen_applications_base_equals_fit():
    x = RNG.normal(size=(32, 32, 32, 3)).astype("float32")
    pipe, _, model = fit_both(transfer, x, Y3[:32], epochs=1, stages=4, micro_batches=2,
                              schedule="1f1b")
    base = model.layers[0]
    assert all(st.names[0].startswith(base.name + "/") for st in pipe.stages[:3])
    assert [v.path.split("/", 1)[1] for v in model.trainable_variables] == ["head/kernel",
                                                                            "head/bias"]
    # frozen weights sit on the stage that calls them, with no optimizer slots
    for st in pipe.stages:
        for layer in st.layers:
            assert {device_of(v) for v in layer.weights} <= {st.device}, layer.name
    slots = {id(v) for v in model.optimizer.variables}
    assert not any(id(v) in slots for v in base.weights)
    assert len(model.optimizer.variables) == 2 + 2 * 2  # iterations, lr, Adam m and v x 2


class TokenAndPosition(keras.layers.Layer):
    """Token plus position embeddings (positions made from the input's shape, in the layer)."""

    def __init__(self, vocab: int, length: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.tokens = keras.layers.Embedding(vocab, dim)
        self.positions = keras.layers.Embedding(length, dim)

    def call(self, ids):
        return self.tokens(ids) + self.positions(keras.ops.arange(keras.ops.shape(ids)[-1]))


class Block(keras.layers.Layer):
    """A pre-norm Transformer block: stays one layer call (a layer, not a model)."""

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.LayerNormalization()
        self.attention = keras.layers.MultiHeadAttention(2, dim // 2)
        self.ff = keras.layers.Dense(dim, activation="gelu")

    def call(self, x):
        h = self.norm(x)
        x = x + self.attention(h, h, use_causal_mask=True)
        return x + self.ff(x)


class GPT(keras.Model):
    """A hand-written GPT: its blocks in a Python list, run in a loop in call()."""

    def __init__(self, vocab: int = 32, length: int = 8, dim: int = 16, depth: int = 4, **kw):
        super().__init__(**kw)
        self.embed = TokenAndPosition(vocab, length, dim, name="embed")
        self.blocks = [Block(dim, name=f"block_{i}") for i in range(depth)]
        self.head = keras.layers.Dense(vocab, name="lm_head")

    def call(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_gpt():
    keras.utils.set_random_seed(0)
    model = GPT()  # not built: tfpipe.fit builds it from the data, as model.fit does
    # SGD: attention key biases get rounding-noise gradients that Adam scales to full steps
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_subclassed_gpt_with_blocks_in_a_list_splits_and_equals_fit():
    ids = RNG.integers(0, 32, size=(32, 9)).astype("int32")
    x, y = ids[:, :-1], ids[:, 1:]
    ref, ref_log = make_gpt(), StepLog()
    ref.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = make_gpt(), StepLog()
    history = tfpipe.fit(model, x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                         callbacks=[log], stages=4, micro_batches=4, schedule="1f1b")
    assert_same_training(ref, ref_log, model, log)
    stages = history.pipeline.stages
    assert [st.names for st in stages] == [["embed", "block_0"], ["block_1"], ["block_2"],
                                           ["block_3", "lm_head"]]
    for st in stages:  # the model's own layer objects, their weights on their stage
        for layer in st.layers:
            assert any(layer is own for own in model._flatten_layers()), layer.name
            assert {device_of(v) for v in layer.weights} <= {st.device}, layer.name


def test_saved_model_after_pipelined_fit_of_nested_models_loads_and_predicts(tmp_path):
    model = make(nested)
    tfpipe.fit(model, X8, Y3, batch_size=16, epochs=1, verbose=0, stages=3, micro_batches=2)
    path = tmp_path / "nested.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [layer.name for layer in loaded.layers[1:]] == ["encoder", "b", "head"]
    np.testing.assert_allclose(loaded.predict(X8, verbose=0), model.predict(X8, verbose=0),
                               rtol=1e-6, atol=1e-7)


def quantized() -> keras.Model:
    """Keras's own int8 quantization: int8 kernels with float scales, frozen; biases train."""
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name="d1")(inputs)
    h = keras.layers.Dense(16, activation="relu", name="d2")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(h))
    model.quantize("int8")
    return model


@pytest.mark.filterwarnings("ignore:Layer InputLayer does not have a `quantize` method")
def test_int8_quantized_model_splits_and_equals_fit():
    pipe, _, model = fit_both(quantized, X8, Y3, stages=3, micro_batches=4, schedule="1f1b")
    kernels = [v for v in model.weights if v.path.endswith("/kernel")]
    assert len(kernels) == 3 and all(v.dtype == "int8" and not v.trainable for v in kernels)
    for st in pipe.stages:
        for layer in st.layers:
            assert {device_of(v) for v in layer.weights} <= {st.device}, layer.name


def test_profiled_balance_and_the_planner_count_the_flattened_calls():
    model = make(nested)
    history = tfpipe.fit(model, X8, Y3, batch_size=16, epochs=1, verbose=0, stages=3,
                         balance="time", micro_batches=2)
    flat = ["encoder/a", "encoder/mlp/s1", "encoder/mlp/s2", "b", "head"]
    assert [c.name for c in history.pipeline.layer_costs] == flat
    assert [n for st in history.pipeline.stages for n in st.names] == flat
    plan = tfpipe.plan(make(nested), X8[:32], stages=[2], micro_batches=[2], schedules=["1f1b"],
                       recompute=["never"], repeats=1, profile_sizes=[16])
    assert plan.profile.names == tuple(flat)
    assert sum(plan.best.balance) == len(flat)
