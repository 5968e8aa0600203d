"""Each stage's variables, optimizer slots, forward outputs, gradients and updates sit on its device."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import tfpipe
from tests.models import build, data
from tfpipe.devices import canonical
from tfpipe.placement import device_of


def traced_graph(pipe: tfpipe.Pipeline, x, y) -> tf.Graph:
    spec = (tf.TensorSpec((None,) + x.shape[1:], tf.float32), tf.TensorSpec((None,), tf.int64))
    with pipe._attached():
        # traced as Keras traces its step: without autograph (keras do_not_convert); with it,
        # autograph converted the executor and once mixed up MicroBatches.split and _split
        fn = tf.function(lambda a, b: pipe.executor.train_step((a, b)), autograph=False)
        return fn.get_concrete_function(*spec).graph


def test_variables_and_slots_on_stage_devices():
    model = build("functional", "adam")
    pipe = tfpipe.Pipeline(model, stages=4, micro_batches=2)
    devices = [s.device for s in pipe.stages]
    assert devices == [f"/device:CPU:{i}" for i in range(4)]
    placed = {}
    for stage in pipe.stages:
        assert stage.model.weights, f"stage {stage.index} holds no variables"
        for v in stage.model.weights:
            assert device_of(v) == stage.device, v.path
            placed[id(v)] = stage.device
    assert len(placed) == len(model.weights)  # every variable of the user's model is placed
    slots = [v for v in model.optimizer.variables if "momentum" in v.path or "velocity" in v.path]
    assert len(slots) == 2 * len(model.trainable_variables)
    by_shape_name = {v.path.replace("/", "_"): placed[id(v)] for v in model.trainable_variables}
    for slot in slots:
        owner = [d for name, d in by_shape_name.items() if name in slot.path]
        assert owner and device_of(slot) == owner[0], slot.path


def test_slots_built_before_the_pipeline_are_moved():
    model = build("mlp", "adam")
    x, y = data("mlp")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)  # Adam slots on CPU:0
    before = [v.numpy() for v in model.optimizer.variables]
    pipe = tfpipe.Pipeline(model, stages=4)
    for stage in pipe.stages:
        for v in stage.trainable_variables:
            name = v.path.replace("/", "_")
            for slot in model.optimizer.variables:
                if name in slot.path:
                    assert device_of(slot) == stage.device, slot.path
    for a, b in zip(before, model.optimizer.variables):  # values survive the move
        assert (a == b.numpy()).all()
    # and training goes on with the moved optimizer exactly as plain Keras would
    ref = build("mlp", "adam")
    ref.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    ref.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    pipe.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(ref.weights, model.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)


def test_weight_decay_exclusions_survive_the_move():
    import keras

    def make():
        model = build("mlp", "sgd")
        opt = keras.optimizers.AdamW(0.01, weight_decay=0.5)
        opt.exclude_from_weight_decay(var_list=[model.layers[0].kernel])
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
        return model

    x, y = data("mlp")
    ref = make()
    ref.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    model = make()
    tfpipe.fit(model, x, y, batch_size=16, stages=4, micro_batches=2, verbose=0, shuffle=False)
    for a, b in zip(ref.weights, model.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)


def test_forward_backward_and_update_ops_on_stage_devices():
    model = build("mlp", "adam")
    x, y = data("mlp")
    pipe = tfpipe.Pipeline(model, stages=4, micro_batches=3)
    graph = traced_graph(pipe, x, y)
    produced = pipe.executor.produced
    assert len(produced) == 2 * 4 * 3  # one F and one B per stage and micro-batch
    for action, tensors in produced.items():
        device = pipe.stages[action.stage].device
        assert tensors, action
        for t in tensors:
            if isinstance(t, tf.IndexedSlices):
                t = t.values
            assert canonical(t.device) == device, (action, t.name, t.device)
    # forward ops are named after their action and placed on the stage's device
    for op in graph.get_operations():
        head = op.name.split("/")[0]
        if head.startswith("stage") and op.device:
            stage = int(head[len("stage"):].split("_")[0])
            assert canonical(op.device) == pipe.stages[stage].device, op.name
    # optimizer math (Adam's square roots) runs beside each stage's variables, not on the caller
    sqrt_devices = {canonical(op.device) for op in graph.get_operations() if op.type == "Sqrt"}
    assert sqrt_devices == {s.device for s in pipe.stages}
    # no op gathers the stages' gradients on one device (Keras's one-replica "all-reduce",
    # an IdentityN of every gradient, is skipped): the updates read them where they are
    gathered = [op for op in graph.get_operations() if op.type == "IdentityN"
                and len({canonical(t.device) for t in op.inputs if t.device}) > 1]
    assert not gathered, [op.name for op in gathered]


def test_single_stage_keeps_everything_on_one_device():
    model = build("cnn", "sgd")
    pipe = tfpipe.Pipeline(model, stages=1, devices=["/cpu:2"])
    assert all(device_of(v) == "/device:CPU:2" for v in model.weights)
    x, y = data("cnn")
    pipe.fit(x, y, batch_size=16, verbose=0)
    assert all(device_of(v) == "/device:CPU:2" for v in model.weights)


def test_seed_generator_state_sits_on_its_stage_device():
    """Dropout reads and advances its seed generator's state on every call: it moves with the
    stage (it is not among the model's weights), and the dropout masks stay Keras's own."""
    import keras

    from tests.test_functional_graphs import micro_batch_reference

    def make():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((8,)), keras.layers.Dense(12, activation="relu"), keras.layers.Dropout(0.3),
            keras.layers.Dense(12, activation="relu"), keras.layers.Dropout(0.3),
            keras.layers.Dense(3, activation="softmax"),
        ])
        model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
        return model

    x, y = data("mlp")
    ref = make()
    micro_batch_reference(ref, x, y, micro_batches=2, epochs=1)
    model = make()
    pipe = tfpipe.Pipeline(model, stages=2, micro_batches=2, devices=["/cpu:1", "/cpu:2"])
    for stage in pipe.stages:
        seeds = [v for layer in stage.layers for v in layer.variables if "seed" in v.path]
        assert seeds, stage.index
        assert all(device_of(v) == stage.device for v in seeds), [(v.path, device_of(v)) for v in seeds]
    pipe.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(ref.weights, model.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def test_metric_variables_sit_on_the_loss_stage():
    """The loss tracker (made at compile) and metrics built by an earlier plain fit move to
    the last stage, which computes the loss and metrics; metrics built later are made there;
    and the reported metrics stay Keras's."""
    model = build("mlp", "adam")  # compiled with metrics=["accuracy"]
    x, y = data("mlp")
    ref = build("mlp", "adam")
    ref_hist = [ref.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False).history
                for _ in range(2)]
    first = model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False).history
    pipe = tfpipe.Pipeline(model, stages=2, micro_batches=2, devices=["/cpu:1", "/cpu:2"])
    assert {v.path for v in model.metrics_variables} >= {"loss/total", "accuracy/total"}
    for v in model.metrics_variables:
        assert device_of(v) == "/device:CPU:2", v.path
    second = pipe.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False).history
    for ours, theirs in zip([first, second], ref_hist):
        for k in theirs:
            np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6, err_msg=k)
