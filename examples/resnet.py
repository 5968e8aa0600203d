"""A residual network pipelined in 4 stages balanced by profiled time.

What it shows: a Functional ResNet (a convolutional stem, residual blocks joined by `Add`
skips, a strided block with a 1x1 projection shortcut, global pooling and a classifier)
split by `balance="time"`: tfpipe times each layer's forward and backward on the first
batch and cuts the layer order where the 4 stages take about equal time, which is not where
parameters would cut a convnet (early full-resolution layers are cheap in parameters but
costly in time). Cuts fall inside residual blocks, so a skip's tensor crosses a stage
boundary and travels straight to the stage that adds it; the example prints which stages
receive such skips. Trained with the 1F1B schedule over 4 micro-batches per batch.

The images are generated, nothing is downloaded: noisy 24x24 stripe textures at one of four
orientations (0, 45, 90, 135 degrees) or a checkerboard, with random frequency, phase and
contrast; about 99% validation accuracy after the default run.

Devices: the GPUs when there are some (one GPU is split into 4 logical GPUs), else 4
logical CPU devices.

Run:
    python examples/resnet.py                                   # default run
    python examples/resnet.py --epochs 2 --train 512 --width 8  # seconds
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from example_setup import set_up_devices, verbosity  # noqa: E402

import tfpipe  # noqa: E402

CLASSES = ["0 deg", "45 deg", "90 deg", "135 deg", "checker"]
STAGES = 4


def make_textures(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` noisy stripe / checkerboard textures and their class labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    yy, xx = np.mgrid[0:size, 0:size].astype("float32")
    angle = np.deg2rad(np.array([0, 45, 90, 135, 0])[labels])[:, None, None]
    angle = angle + rng.normal(0, 0.08, (n, 1, 1))  # a little jitter
    freq = rng.uniform(0.5, 1.2, (n, 1, 1))  # radians per pixel
    phase = rng.uniform(0, 2 * np.pi, (n, 2, 1, 1))
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    stripes = np.sin(freq * u + phase[:, 0])
    checker = np.sign(np.sin(freq * u + phase[:, 0]) * np.sin(freq * v + phase[:, 1]))
    images = np.where((labels == 4)[:, None, None], checker, stripes)
    images *= rng.uniform(0.3, 1.0, (n, 1, 1))  # contrast
    images += rng.normal(0, 0.8, images.shape)  # noise
    return images[..., None].astype("float32"), labels.astype("int32")


def residual_block(x, filters: int, name: str, stride: int = 1):
    """conv-BN-ReLU-conv-BN plus the shortcut (a strided 1x1 projection when shapes change)."""
    h = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                            name=f"{name}_conv1")(x)
    h = keras.layers.BatchNormalization(name=f"{name}_bn1")(h)
    h = keras.layers.Activation("relu", name=f"{name}_relu1")(h)
    h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(h)
    h = keras.layers.BatchNormalization(name=f"{name}_bn2")(h)
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                       name=f"{name}_project")(x)
        shortcut = keras.layers.BatchNormalization(name=f"{name}_project_bn")(shortcut)
    h = keras.layers.Add(name=f"{name}_add")([h, shortcut])
    return keras.layers.Activation("relu", name=f"{name}_out")(h)


def build_model(size: int, width: int, blocks: int) -> keras.Model:
    image = keras.Input((size, size, 1), name="image")
    h = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem_conv")(image)
    h = keras.layers.BatchNormalization(name="stem_bn")(h)
    h = keras.layers.Activation("relu", name="stem_relu")(h)
    for i in range(blocks):
        h = residual_block(h, width, f"res{i + 1}")
    h = residual_block(h, 2 * width, "down", stride=2)
    for i in range(blocks):
        h = residual_block(h, 2 * width, f"res{blocks + i + 1}")
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    logits = keras.layers.Dense(len(CLASSES), name="logits")(h)
    return keras.Model(image, logits, name="texture_resnet")


def made_by(tensor) -> str:
    """The name of the layer (or model input) that makes a KerasTensor of the model's graph."""
    history = getattr(tensor, "_keras_history", None)
    return history.operation.name if history is not None else tensor.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train", type=int, default=6000, help="training images")
    parser.add_argument("--val", type=int, default=1000, help="validation images")
    parser.add_argument("--image-size", type=int, default=24)
    parser.add_argument("--width", type=int, default=16, help="filters of the first blocks")
    parser.add_argument("--blocks", type=int, default=2, help="residual blocks per resolution")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b", "zb-h1"])
    args = parser.parse_args()

    devices = set_up_devices(STAGES)
    keras.utils.set_random_seed(0)
    x_train, y_train = make_textures(args.train, args.image_size, seed=1)
    x_val, y_val = make_textures(args.val, args.image_size, seed=2)
    print(f"data: {args.train} training and {args.val} validation textures of "
          f"{args.image_size}x{args.image_size}, classes {CLASSES}")

    model = build_model(args.image_size, args.width, args.blocks)
    steps = args.epochs * -(-args.train // args.batch_size)
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, steps)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )

    # balance="time" profiles every layer's forward and backward on a sample batch (tfpipe.fit
    # would take its first batch) and cuts where the stages take about equal time.
    pipe = tfpipe.Pipeline(model, stages=STAGES, devices=devices, balance="time",
                           sample=x_train[:args.batch_size], micro_batches=args.micro_batches,
                           schedule=args.schedule)
    pipe.summary()
    for stage in pipe.stages[1:]:
        if len(stage.inputs) > 1:
            print(f"stage {stage.index} receives {len(stage.inputs)} tensors, a skip crosses "
                  f"into it: {', '.join(made_by(t) for t in stage.inputs)}")

    history = pipe.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
                       validation_data=(x_val, y_val), verbose=verbosity())
    print("loss by epoch:", " ".join(f"{v:.4f}" for v in history.history["loss"]))
    print(f"validation accuracy {history.history['val_accuracy'][-1]:.4f} "
          f"(chance {1 / len(CLASSES):.2f})")


if __name__ == "__main__":
    main()
