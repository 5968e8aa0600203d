"""The next batch is made on the host while a step runs, on every data path of a pipelined fit.

Keras's data adapters end the `tf.data` pipelines they build in `prefetch(AUTOTUNE)` (arrays,
generators, a `PyDataset`; with workers its enqueuer makes batches ahead); a dataset the user
gives gets the same prefetch from TensorFlow's `inject_prefetch` rewrite when its iterator is
made, unless its options turn autotune or that rewrite off: then `tfpipe.data.host_prefetched`
adds it. Evidence without timing: a callback holds the training loop at the end of step k
until batch k+1 has been made; only a prefetch makes it then, since step k+1 has not started
(without one, the wait runs out: `dataset_autotune_off` did before tfpipe added it).
"""

from __future__ import annotations

import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpipe
from tfpipe.data import host_prefetched

B, STEPS, WAIT_S = 8, 5, 20.0
RNG = np.random.default_rng(0)
X = RNG.normal(size=(B * STEPS, 4)).astype("float32")
Y = RNG.integers(0, 3, size=B * STEPS)


class Made:
    """The indices of the batches made so far (from any thread)."""

    def __init__(self) -> None:
        self.indices: set[int] = set()
        self.lock = threading.Lock()

    def batch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            self.indices.add(i)
        return X[i * B:(i + 1) * B], Y[i * B:(i + 1) * B]

    def has(self, i: int) -> bool:
        with self.lock:
            return i in self.indices


class HoldUntilNextBatchIsMade(keras.callbacks.Callback):
    """At the end of step k, waits (up to WAIT_S) until batch k+1 is made; records if it was.

    Batches 0 and 1 are left out: Keras reads them before training to learn the element spec
    of a generator or a `PyDataset` (`NUM_BATCHES_FOR_TENSOR_SPEC`)."""

    def __init__(self, made: Made) -> None:
        super().__init__()
        self.made, self.ready = made, {}

    def on_train_batch_end(self, batch, logs=None):
        if 2 <= batch + 1 < STEPS:
            deadline = time.monotonic() + WAIT_S
            while not self.made.has(batch + 1) and time.monotonic() < deadline:
                time.sleep(0.005)
            self.ready[batch + 1] = self.made.has(batch + 1)


def dataset(made: Made, options: tf.data.Options | None = None) -> tf.data.Dataset:
    """Batch i made by Python when tf.data asks for element i; no prefetch of its own."""
    def make(i):
        x, y = tf.py_function(lambda j: made.batch(int(j)), [i], [tf.float32, tf.int64])
        return tf.ensure_shape(x, [B, 4]), tf.ensure_shape(y, [B])

    ds = tf.data.Dataset.range(STEPS).map(make)
    return ds if options is None else ds.with_options(options)


def options(**changes) -> tf.data.Options:
    o = tf.data.Options()
    o.autotune.enabled = changes.get("autotune", True)
    o.experimental_optimization.inject_prefetch = changes.get("inject_prefetch", True)
    return o


class Batches(keras.utils.PyDataset):
    def __init__(self, made: Made, **kwargs):
        super().__init__(**kwargs)
        self.made = made

    def __len__(self):
        return STEPS

    def __getitem__(self, i):
        return self.made.batch(i)


SOURCES = {
    "dataset": lambda made: dataset(made),
    "dataset_autotune_off": lambda made: dataset(made, options(autotune=False)),
    "dataset_inject_prefetch_off": lambda made: dataset(made, options(inject_prefetch=False)),
    "generator": lambda made: (made.batch(i) for i in range(STEPS)),
    "pydataset": lambda made: Batches(made),
    "pydataset_workers": lambda made: Batches(made, workers=2),
}


def compiled() -> keras.Model:
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                          keras.layers.Dense(3)])
    m.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(True))
    return m


@pytest.mark.parametrize("source", SOURCES)
def test_next_batch_is_made_on_the_host_before_its_step_starts(source):
    made = Made()
    hold = HoldUntilNextBatchIsMade(made)
    piped = compiled()
    pipe = tfpipe.Pipeline(piped, stages=2, micro_batches=2, devices=["/cpu:1", "/cpu:2"])
    pipe.fit(SOURCES[source](made), epochs=1, verbose=0, callbacks=[hold], shuffle=False,
             steps_per_epoch=STEPS if source == "generator" else None)
    assert hold.ready == {k: True for k in range(2, STEPS)}, hold.ready
    ref = compiled()  # the same batches in the same order: plain model.fit's weights
    ref.fit(X, Y, batch_size=B, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(ref.weights, piped.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def ends_in_prefetch(ds: tf.data.Dataset) -> bool:
    """Whether the last dataset op of `ds`'s serialized graph, options aside, is a prefetch."""
    graph = tf.compat.v1.GraphDef.FromString(ds._as_serialized_graph().numpy())
    nodes = {n.name: n for n in graph.node}
    (node,) = [nodes[n.input[0].split(":")[0]] for n in graph.node if n.op == "_Retval"]
    while node.op.startswith("OptionsDataset"):
        node = nodes[node.input[0].split(":")[0]]
    return node.op.startswith("PrefetchDataset")


def test_every_dataset_keras_iterates_ends_in_a_prefetch(monkeypatch):
    """Arrays (Keras's adapter) and a dataset with autotune off (tfpipe's prefetch) for fit, its
    validation data, evaluate and predict: every dataset Keras iterates ends in a prefetch."""
    iterated = []
    original = tf.data.Dataset.__iter__

    def spy(self):
        iterated.append(self)
        return original(self)

    monkeypatch.setattr(tf.data.Dataset, "__iter__", spy)
    pipe = tfpipe.Pipeline(compiled(), stages=2, micro_batches=2, devices=["/cpu:1", "/cpu:2"])
    plain = tf.data.Dataset.from_tensor_slices((X, Y)).batch(B).with_options(
        options(autotune=False))
    assert not ends_in_prefetch(plain)
    pipe.fit(X, Y, batch_size=B, epochs=1, verbose=0, validation_data=(X, Y))
    pipe.fit(plain, epochs=1, verbose=0, validation_data=plain)
    pipe.evaluate(plain, verbose=0)
    pipe.predict(plain.map(lambda x, y: x), verbose=0)
    assert len({id(ds) for ds in iterated}) == 6, iterated  # Keras iterates each again at an epoch end
    assert all(ends_in_prefetch(ds) for ds in iterated)


def test_host_prefetched_adds_a_prefetch_only_where_there_is_none():
    ends = tf.data.Dataset.range(8).batch(4).prefetch(1).with_options(options(autotune=False))
    assert host_prefetched(ends) is ends
    assert host_prefetched(X) is X and host_prefetched((X, Y)) == (X, Y)
    added = host_prefetched(tf.data.Dataset.range(8).batch(4).with_options(
        options(autotune=False)))
    assert ends_in_prefetch(added)
    assert [b.tolist() for b in added.as_numpy_iterator()] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert not added.options().autotune.enabled  # the user's options are kept
