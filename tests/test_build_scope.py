"""`tfpipe.build_scope`: a model's weights are made only on their stage's device, and the
model trains exactly like the same model built the usual way and trained by `model.fit`.

Also: moving an already-built model frees each host copy, even after a plain `model.fit`
left a traced step holding the old storage (the allocator figure that showed it).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tfpipe
from benchmarks.model_families import BATCH, FAMILIES
from benchmarks.model_families import data as hub_data
from tests.models import MODELS, StepLog, assert_same_training, data
from tests.test_any_model import GPT, RNG
from tfpipe import allocator
from tfpipe._keras import deferred_count, is_deferred
from tfpipe.placement import device_of

MIB = 2**20


def _functional() -> keras.Model:
    keras.utils.set_random_seed(0)
    return MODELS["functional"]()


def _gpt() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = GPT()
    model(GPT_IDS[:2, :-1])  # a subclassed model is built by a call (in the scope: no storage)
    return model


def _hub() -> keras.Model:
    keras.utils.set_random_seed(0)
    return FAMILIES["gpt2"][0]()


def _compile_classifier(model: keras.Model) -> None:
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def _compile_lm(model: keras.Model) -> None:
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


GPT_IDS = RNG.integers(0, 32, size=(32, 9)).astype("int32")
BUILDERS = {  # the model (built in the scope or not), its compile (after the scope), data
    "functional": (_functional, _compile_classifier, data("functional"), 16),
    "subclassed": (_gpt, _compile_lm, (GPT_IDS[:, :-1], GPT_IDS[:, 1:]), 16),
    "keras_hub": (_hub, _compile_lm, hub_data("causal"), BATCH),
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_model_built_in_the_scope_is_made_on_its_stages_and_trains_like_fit(kind):
    builder, compile_model, (x, y), batch_size = BUILDERS[kind]
    ref, ref_log = builder(), StepLog()
    compile_model(ref)
    ref.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[ref_log])
    pending = deferred_count()
    with tfpipe.build_scope():
        model = builder()
    compile_model(model)
    assert deferred_count() == pending  # nothing left for Keras to make on the default device
    weights = model.weights
    assert weights and all(is_deferred(v) for v in weights), [
        v.path for v in weights if not is_deferred(v)]
    log = StepLog()
    history = tfpipe.fit(model, x, y, batch_size=batch_size, epochs=1, shuffle=False,
                         verbose=0, callbacks=[log], stages=4, micro_batches=4,
                         schedule="1f1b")
    assert_same_training(ref, ref_log, model, log, batch_size=batch_size)
    for stage in history.pipeline.stages:
        for v in stage.model.variables:
            owner = history.pipeline.stages[stage.shared_from.get(id(v), stage.index)]
            assert device_of(v) == owner.device, (v.path, stage.index)
    assert not any(is_deferred(v) for v in model.variables + model.optimizer.variables)


def test_scope_allocates_nothing_until_the_pipeline_places_each_stage():
    reason = allocator.unavailable("CPU:0")
    if reason is not None:
        pytest.skip(reason=reason)
    width, layers = 1024, 4  # 16 MiB of float32 kernels

    def make() -> keras.Model:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((width,))]
                                 + [keras.layers.Dense(width) for _ in range(layers)])
        model.compile(optimizer="sgd", loss="mse")
        return model

    before = allocator.current_bytes("CPU:0")
    with tfpipe.build_scope():
        model = make()
    built = allocator.current_bytes("CPU:0") - before
    assert built < MIB, f"{built / MIB:.2f} MiB allocated by a model built in the scope"
    tfpipe.Pipeline(model, stages=2, micro_batches=2)
    placed = allocator.current_bytes("CPU:0") - before
    size = sum(int(np.prod(v.shape)) * 4 for v in model.weights)
    assert abs(placed - size) < MIB, (placed / MIB, size / MIB)  # each weight made once


@pytest.mark.parametrize("rank_loops", [False, True])
def test_moving_after_a_plain_fit_frees_the_old_storage(rank_loops):
    """A plain `model.fit` leaves its traced step's graph alive (out of Python's reach),
    holding the old storage's handle; before `reset_storage` emptied the old storage, the
    first pipelined step copied each moved variable on write and left the old buffers
    allocated: 48.0 MiB in use for 32 MiB of weights on two logical devices. The rank loops
    held 16 MiB more: their gradient sums' zeros, folded into constants the runtime keeps."""
    reason = allocator.unavailable("CPU:0")
    if reason is not None:
        pytest.skip(reason=reason)
    keras.utils.set_random_seed(0)
    width, layers = 1024, 4
    model = keras.Sequential([keras.Input((width,))]
                             + [keras.layers.Dense(width) for _ in range(layers)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).normal(size=(32, width)).astype("float32")
    model.fit(x, x, batch_size=32, epochs=1, verbose=0)
    size = sum(int(np.prod(v.shape)) * 4 for v in model.weights)
    start = allocator.current_bytes("CPU:0")
    assert start > size - MIB  # the weights are in use (biases may come from a small pool)
    tfpipe.fit(model, x, x, batch_size=32, epochs=2, verbose=0, stages=4, micro_batches=2,
               rank_loops=rank_loops)
    grown = allocator.current_bytes("CPU:0") - start
    assert grown < MIB, f"{grown / MIB:.1f} MiB more in use after pipelined steps"


def test_a_variable_made_from_a_fixed_value_in_the_scope_is_a_clear_error():
    class Fixed(keras.layers.Layer):
        def build(self, input_shape):
            self.table = keras.Variable(np.ones((3, 3), "float32"), name="table")

        def call(self, x):
            return x @ self.table

    with pytest.raises(tfpipe.PipelineError, match="fixed value.*Constant"):
        with tfpipe.build_scope():
            keras.Sequential([keras.Input((3,)), Fixed(name="fixed")])
