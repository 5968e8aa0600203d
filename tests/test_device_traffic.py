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

`Pipeline.summary()` gives the least per pair of devices from the cuts alone
(`tfpipe.cut_traffic`); its activations and gradients equal the placed step's, pair by pair
and as printed, for skips, early model outputs, two readers on one device, replicas and
mixed precision.
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


# Pipeline.summary(): the least bytes between devices, from the cuts alone --------------------

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def skip_model() -> keras.Model:
    """Stage 0 makes `a` (read by stages 1 and 2: a skip) and the model output `aux` (read by
    stage 1, and by the last stage for its loss); stage 1 makes `b` for stage 2."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((WIDTH,))
    a = keras.layers.Dense(16, activation="relu", name="a")(inputs)
    aux = keras.layers.Dense(3, name="aux")(a)
    ab = keras.layers.Concatenate(name="ab")([a, aux])
    b = keras.layers.Dense(8, activation="relu", name="b")(ab)
    h = keras.layers.Concatenate(name="cat")([keras.layers.Dense(8, name="c")(b), a])
    m = keras.Model(inputs, [aux, keras.layers.Dense(3, name="out")(h)])
    m.compile(keras.optimizers.SGD(0.1), [CE, CE])
    return m


def two_readers_on_one_device() -> keras.Model:
    """Interleaved on two devices: `a` (stage 0, CPU:1) is read by stages 1 and 3, both on CPU:2."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((WIDTH,))
    a = keras.layers.Dense(16, name="a")(inputs)
    h = keras.layers.Dense(8, name="c")(keras.layers.Dense(8, name="b")(a))
    h = keras.layers.Concatenate(name="cat")([keras.layers.Dense(8, name="d")(h), a])
    m = keras.Model(inputs, keras.layers.Dense(3, name="out")(h))
    m.compile(keras.optimizers.SGD(0.1), CE)
    return m


def cells(line: str) -> list[str]:
    import re

    return re.split(r"\s{2,}", line.strip())


def table_after(text: str, title: str) -> dict[str, dict[str, str]]:
    """The text table that starts on the line after the one starting with `title`
    (or at the first line when `title` is empty): `{"a -> b": {column: cell}}`."""
    lines = text.splitlines()
    start = 0 if not title else next(i for i, s in enumerate(lines) if s.startswith(title)) + 1
    header, rows = cells(lines[start]), {}
    for line in lines[start + 2:]:
        if " -> " not in line:
            break
        row = cells(line)
        rows[row[0]] = dict(zip(header[1:], row[1:]))
    return rows


def test_summary_shows_the_least_bytes_per_sample_of_each_cut():
    from tfpipe.cut_traffic import least_traffic
    from tfpipe.partition import read_graph

    m = skip_model()
    pipe = tfpipe.Pipeline(m, balance=[2, 2, 3], micro_batches=M,
                           devices=["/cpu:1", "/cpu:2", "/cpu:3"])
    assert [st.names for st in pipe.stages] == [["a", "aux"], ["ab", "b"], ["c", "cat", "out"]]
    cpu = [f"/device:CPU:{i}" for i in range(4)]
    a, aux, b = 16 * 4, 3 * 4, 8 * 4  # bytes per sample, float32
    expected = {(cpu[1], cpu[2]): (a + aux, 0), (cpu[1], cpu[3]): (a + aux, 0),
                (cpu[2], cpu[3]): (b, 0), (cpu[2], cpu[1]): (0, a + aux),
                (cpu[3], cpu[1]): (0, a + aux), (cpu[3], cpu[2]): (0, b)}
    outputs = keras.tree.flatten(read_graph(m).outputs)
    least = least_traffic(pipe.stages, pipe.replica_devices, outputs, M)
    assert {p: (r["activations"], r["gradients"]) for p, r in least.items()} == expected
    text = pipe.summary(print_fn=lambda _: None)
    rows = table_after(text, "Least bytes between devices per sample")
    assert {tuple(k.split(" -> ")): (r["activations"], r["gradients"]) for k, r in rows.items()} == {
        p: tuple(f"{n} B" if n else "0" for n in v) for p, v in expected.items()}, text
    assert "Pipeline.traffic(x, y) measures a step" in text


CASES = {  # name: (model, pipeline arguments)
    "chain": (lambda: model("adam"), dict(stages=2, devices=["/cpu:1", "/cpu:2"])),
    "skip_and_early_output": (skip_model, dict(balance=[2, 2, 3],
                                               devices=["/cpu:1", "/cpu:2", "/cpu:3"])),
    "two_readers_on_one_device": (two_readers_on_one_device, dict(
        balance=[1, 1, 1, 3], schedule="interleaved", devices=["/cpu:1", "/cpu:2"])),
    "replicas": (lambda: model("adam"), dict(stages=2, replicas=2,
                                             devices=[f"/cpu:{i}" for i in range(4)])),
    "mixed_float16": (lambda: model("mixed_float16"), dict(stages=2, devices=["/cpu:1", "/cpu:2"])),
}


@pytest.mark.parametrize("case, policy", [
    (c, "mixed_float16" if c == "mixed_float16" else "float32") for c in CASES
], indirect=["policy"])
def test_summary_least_traffic_equals_the_measured_activations_and_gradients(case, policy):
    """After `traffic(x, y)` the summary gives the least bytes for its batch (30 samples: uneven
    micro-batches, and uneven shares of two replicas) beside what the step sent; the least's
    activations and gradients are exactly the placed step's, pair by pair and as printed."""
    from tfpipe.cut_traffic import least_traffic
    from tfpipe.partition import read_graph

    make, kwargs = CASES[case]
    m = make()
    pipe = tfpipe.Pipeline(m, micro_batches=M, **kwargs)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, WIDTH)).astype("float32")
    y = rng.integers(0, 3, size=30)
    table = pipe.traffic(x, y if len(m.outputs) == 1 else [y, y], print_fn=lambda _: None)
    outputs = keras.tree.flatten(read_graph(m).outputs)
    least = least_traffic(pipe.stages, pipe.replica_devices, outputs, M, batch=30)
    measured = {pair: (row["activations"], row["gradients"])
                for pair, row in pipe._traffic.pairs.items()
                if row["activations"] or row["gradients"]}
    assert {p: (r["activations"], r["gradients"]) for p, r in least.items()} == measured
    text = pipe.summary(print_fn=lambda _: None)
    summary = table_after(text, "Least bytes between devices per step of 30 samples")
    by_kind = table_after(table, "")
    assert summary.keys() == by_kind.keys(), text
    for pair, row in by_kind.items():
        for kind in ("activations", "gradients"):
            assert summary[pair][kind] == row.get(kind, "0"), (pair, kind, text, table)
    if case == "replicas":
        assert "Replicas add" in text, text


def test_skip_gradients_go_straight_back_and_train_like_keras():
    """Stage 2's gradients for `a` and `aux` go from CPU:3 straight to CPU:1, not through stage
    1's CPU:2 (they used to be added to stage 1's there first), and training equals model.fit."""
    from tfpipe.traffic import kind_of

    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH, WIDTH)).astype("float32")
    y = rng.integers(0, 3, size=BATCH)
    ref = skip_model()
    ref.fit(x, [y, y], batch_size=BATCH, epochs=2, verbose=0, shuffle=False)
    piped = skip_model()
    pipe = tfpipe.Pipeline(piped, balance=[2, 2, 3], micro_batches=M,
                           devices=["/cpu:1", "/cpu:2", "/cpu:3"])
    with pipe._attached():
        step = tf.function(lambda a, b: pipe.executor.train_step((a, b)), autograph=False)
        sent = placed_transfers(step, tf.constant(x), [tf.constant(y), tf.constant(y)])
    grads = {}
    for t in sent:
        if kind_of(t) == "gradients":
            key = (t.source[-1], t.target[-1])
            grads[key] = grads.get(key, 0) + t.nbytes
    a, aux, b = 16 * 4 * BATCH, 3 * 4 * BATCH, 8 * 4 * BATCH
    assert grads == {("3", "1"): a + aux, ("3", "2"): b, ("2", "1"): a + aux}, grads
    pipe.fit(x, [y, y], batch_size=BATCH, epochs=1, verbose=0, shuffle=False)  # 1 + this one
    for w, v in zip(ref.weights, piped.weights):
        np.testing.assert_allclose(v.numpy(), w.numpy(), rtol=1e-5, atol=1e-6, err_msg=w.path)
