"""Bytes a pipelined step moves between devices, as TensorFlow placed and partitioned it.

Two stages on CPU:1 and CPU:2, the caller on CPU:0 (as a client and two workers). The least a
step must move: the inputs to stage 0, the labels to stage 1, and per micro-batch the boundary
activation forward and its gradient back. Keras's optimizer computes weight decay, clipping,
loss-scale unscaling, constraints and EMA outside `update_step`; made without a device, that
math ran on CPU:0 and every weight or gradient of both stages crossed to it and back (about 4x
the least here, 22x on the issue's 32 MiB MLP). `tfpipe.placement.ops_follow_their_data`
keeps it beside the variables, and only scalars cross. Each case also trains as plain
`model.fit` does.

With `replicas=2` the least adds, per stage, one read of its weights by copy 1 and one
gradient sum sent back to copy 0 (`test_replicas_read_each_weight_once_per_step...`).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpipe
from tfpipe.traffic import placed_transfers

WIDTH, BATCH, M = 64, 32, 2

OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.01),
    "clipnorm": lambda: keras.optimizers.SGD(0.1, clipnorm=1.0),
    "clipvalue": lambda: keras.optimizers.SGD(0.1, clipvalue=0.01),
    "global_clipnorm": lambda: keras.optimizers.Adam(0.01, global_clipnorm=0.1),
    "ema": lambda: keras.optimizers.Adam(0.01, use_ema=True, ema_momentum=0.9),
    "mixed_float16": lambda: keras.optimizers.SGD(0.1),  # Adam would turn fp16 noise into ±lr
    "constraint": lambda: keras.optimizers.SGD(0.1),
}


def model(case: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    constraint = keras.constraints.MaxNorm(0.5) if case == "constraint" else None
    layers = [keras.layers.Dense(WIDTH, activation="relu", kernel_constraint=constraint)
              for _ in range(4)]
    m = keras.Sequential([keras.Input((WIDTH,)), *layers, keras.layers.Dense(3, dtype="float32")])
    m.compile(OPTIMIZERS[case](), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield
    keras.mixed_precision.set_global_policy("float32")


def least_bytes(pipe: tfpipe.Pipeline, x: np.ndarray, y: np.ndarray) -> int:
    """Inputs and labels once, and each boundary activation forward and its gradient back;
    with R replicas, per copy r > 0 one read of every weight and one gradient per weight."""
    boundary = pipe.stages[0].model.outputs[0]
    per_sample = int(np.prod(boundary.shape[1:])) * np.dtype(boundary.dtype).itemsize
    return (x.nbytes + y.nbytes + 2 * len(x) * per_sample
            + 2 * (pipe.replicas - 1) * weight_bytes(pipe.model.trainable_variables))


def weight_bytes(variables: list) -> int:
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)


@pytest.mark.parametrize(
    "case, policy",
    [(c, "mixed_float16" if c == "mixed_float16" else "float32") for c in OPTIMIZERS],
    indirect=["policy"],
)
def test_optimizer_math_stays_beside_its_variables(case, policy):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    y = rng.integers(0, 3, size=BATCH)
    ref = model(case)
    ref.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False)

    piped = model(case)
    pipe = tfpipe.Pipeline(piped, stages=2, micro_batches=M, devices=["/cpu:1", "/cpu:2"])
    with pipe._attached():
        step = tf.function(lambda a, b: pipe.executor.train_step((a, b)), autograph=False)
        sent = placed_transfers(step, tf.constant(x), tf.constant(y))
    unknown = [t for t in sent if t.nbytes is None]
    assert not unknown, unknown
    least = least_bytes(pipe, x, y)
    total = sum(t.nbytes for t in sent)
    large = [t for t in sent if t.nbytes > 64 and "stage" not in t.tensor and "split" not in t.tensor]
    assert total <= 1.05 * least, (case, total, least, large)
    assert not large, large
    # the step above trained once; one more with fit, and the weights are model.fit's
    pipe.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    tol = 2e-3 if case == "mixed_float16" else 1e-5
    for a, b in zip(ref.weights, piped.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=tol, atol=tol, err_msg=a.path)


def test_batch_is_split_on_the_host_and_sent_straight_to_its_stages():
    """On a GPU machine ops without a device default to GPU:0; here the step is traced under
    CPU:3 to stand for it. The batch arrives on the host (CPU:0): each micro-batch's inputs
    go straight to stage 0 and its labels straight to the last stage, none through CPU:3."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    y = rng.integers(0, 3, size=BATCH)
    piped = model("sgd")
    piped.compile(piped.optimizer, piped.loss, metrics=["accuracy"])
    pipe = tfpipe.Pipeline(piped, stages=2, micro_batches=M, devices=["/cpu:1", "/cpu:2"])
    with pipe._attached():
        def step(a, b):
            with tf.device("/cpu:3"):
                return pipe.executor.train_step((a, b))

        sent = placed_transfers(tf.function(step, autograph=False), tf.constant(x), tf.constant(y))
    through = [t for t in sent if "CPU:3" in t.source + t.target and t.nbytes > 8]
    assert not through, through
    total = sum(t.nbytes or 0 for t in sent)
    assert total <= 1.05 * least_bytes(pipe, x, y), (total, least_bytes(pipe, x, y))


def test_traffic_by_kind_names_what_crosses_between_which_devices():
    from tfpipe.traffic import kind_of, traffic_table

    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    y = rng.integers(0, 3, size=BATCH)
    pipe = tfpipe.Pipeline(model("adam"), stages=2, micro_batches=M, devices=["/cpu:1", "/cpu:2"])
    with pipe._attached():
        step = tf.function(lambda a, b: pipe.executor.train_step((a, b)), autograph=False)
        sent = placed_transfers(step, tf.constant(x), tf.constant(y))
    by = {}
    for t in sent:
        key = (t.source[-5:], t.target[-5:], kind_of(t))
        by[key] = by.get(key, 0) + t.nbytes
    boundary = BATCH * WIDTH * 4  # the whole batch's activations at the cut, float32
    assert by[("CPU:0", "CPU:1", "inputs")] == x.nbytes
    assert by[("CPU:0", "CPU:2", "labels")] == y.nbytes
    assert by[("CPU:1", "CPU:2", "activations")] == boundary
    assert by[("CPU:2", "CPU:1", "gradients")] == boundary
    assert not [k for k in by if k[2] == "other"], by
    table = traffic_table(sent)
    assert "/device:CPU:0 -> /device:CPU:2" in table and "labels" in table, table


def test_pipeline_traffic_reports_a_step_and_trains_nothing():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    y = rng.integers(0, 3, size=BATCH)
    piped = model("adam")
    pipe = tfpipe.Pipeline(piped, stages=2, micro_batches=M, devices=["/cpu:1", "/cpu:2"])
    before = [v.numpy() for v in [*piped.variables, *piped.optimizer.variables]]
    lines = []
    text = pipe.traffic(x, y, print_fn=lines.append)
    assert lines == [text]
    rows = {line.split("  ")[0]: line for line in text.splitlines()[2:]}
    header = text.splitlines()[0].split("  ")
    header = [h.strip() for h in header if h.strip()]
    assert header[1:] == ["inputs", "labels", "activations", "gradients", "scalars"], text
    expected = {"/device:CPU:0 -> /device:CPU:1": "inputs", "/device:CPU:0 -> /device:CPU:2":
                "labels", "/device:CPU:1 -> /device:CPU:2": "activations",
                "/device:CPU:2 -> /device:CPU:1": "gradients"}
    for pair, row in rows.items():
        cells = dict(zip(header[1:], [c for c in row[len(pair):].split("  ") if c.strip()]))
        big = {k for k, v in cells.items() if v.strip() != "0" and k != "scalars"}
        assert big == ({expected[pair]} if pair in expected else set()), (pair, row)
    after = [v.numpy() for v in [*piped.variables, *piped.optimizer.variables]]
    for a, b in zip(before, after):  # the step it ran was undone: weights, slots, step count
        np.testing.assert_array_equal(a, b)
    # and training afterwards is model.fit's
    ref = model("adam")
    ref.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    pipe.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(ref.weights, piped.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def test_pipeline_traffic_takes_a_dict_of_inputs():
    keras.utils.set_random_seed(0)
    a, b = keras.Input((WIDTH,), name="a"), keras.Input((4,), name="b")
    h = keras.layers.Dense(WIDTH, activation="relu")(a)
    h = keras.layers.Concatenate()([keras.layers.Dense(WIDTH)(h), b])
    m = keras.Model({"a": a, "b": b}, keras.layers.Dense(3)(h))
    m.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pipe = tfpipe.Pipeline(m, stages=2, micro_batches=M, devices=["/cpu:1", "/cpu:2"])
    rng = np.random.default_rng(1)
    x = {"a": rng.normal(size=(BATCH, WIDTH)).astype("float32"),
         "b": rng.normal(size=(BATCH, 4)).astype("float32")}
    text = pipe.traffic(x, rng.integers(0, 3, size=BATCH), print_fn=lambda _: None)
    assert "inputs" in text.splitlines()[0] and "/device:CPU:0 -> /device:CPU:2" in text, text


@pytest.mark.parametrize("micro_batches", [1, 4])
def test_replicas_read_each_weight_once_per_step_and_send_one_gradient_back(micro_batches):
    """Two copies of a 2-stage pipeline: copy 0 on CPU:0-1 (holding the variables), copy 1 on
    CPU:2-3. Copy 1 reads each stage's weights once a step, whatever M (it used to read them
    on every call of its stage functions: M copies a step, and unseen here, as the placed
    graphs of functions called inside the step are not reported), and sends one gradient sum
    per variable to copy 0's device, where the reduction reads it (its one result; an
    all-reduce's second was dropped). Nothing else crosses but the batch, the boundary
    tensors and scalars (metric updates)."""
    from tfpipe.traffic import kind_of, traffic_table

    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    y = rng.integers(0, 3, size=BATCH)
    cpus = [f"/device:CPU:{i}" for i in range(4)]
    pipe = tfpipe.Pipeline(model("adam"), stages=2, replicas=2, micro_batches=micro_batches,
                           devices=cpus)
    with pipe._attached():
        step = tf.function(lambda a, b: pipe.executor.train_step((a, b)), autograph=False)
        sent = placed_transfers(step, tf.constant(x), tf.constant(y))
    for k, stage in enumerate(pipe.stages):
        own, copy = cpus[k], cpus[2 + k]
        reads = [t for t in sent if kind_of(t) == "weights"]
        reads = [t for t in reads if (t.source, t.target) == (own, copy)]
        assert len(reads) == len(stage.trainable_variables), reads
        assert sum(t.nbytes for t in reads) == weight_bytes(stage.trainable_variables)
        back = [t for t in sent if kind_of(t) == "weight_grads"]
        back = [t for t in back if (t.source, t.target) == (copy, own)]
        assert len(back) == len(stage.trainable_variables), back
        assert sum(t.nbytes for t in back) == weight_bytes(stage.trainable_variables)
        assert all(any(r.startswith(f"stage{k}_reduce/") for r in t.readers) for t in back)
    kinds = {kind_of(t) for t in sent}
    assert kinds <= {"inputs", "labels", "activations", "gradients", "weights", "weight_grads",
                     "scalars"}, [t for t in sent if kind_of(t) == "other"]
    # copy 0's stage 0 is on CPU:0, the host: its half of the inputs does not cross
    total, least = sum(t.nbytes or 0 for t in sent), least_bytes(pipe, x, y) - x.nbytes // 2
    assert least < total <= 1.01 * least, (total, least)
    header = traffic_table(sent).splitlines()[0]
    assert "weights" in header and "weight_grads" in header and "other" not in header
