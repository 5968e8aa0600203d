"""A convolutional image classifier pipelined in 4 stages with the 1F1B schedule.

What it shows: a Sequential convnet (Conv2D, BatchNormalization, MaxPooling, a dense head)
split by `tfpipe.Pipeline` into 4 stages on 4 devices, trained with the one-forward-one-
backward schedule over 4 micro-batches per batch, validated and evaluated pipelined. The
images are generated with NumPy, nothing is downloaded: noisy 32x32 drawings of a ring, a
square outline (rotated) or a line segment at random positions, sizes and angles, and the
model learns to tell them apart (99-100% test accuracy after the default run, in
under a minute on 2 CPU cores).

Devices: the GPUs when there are some (one GPU is split into 4 logical GPUs), else 4
logical CPU devices (which show placement, not speed).

Run:
    python examples/convnet.py                                          # default run
    python examples/convnet.py --epochs 2 --train 512 --image-size 16   # seconds
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from example_setup import set_up_devices, verbosity  # noqa: E402

import tfpipe  # noqa: E402

CLASSES = ["ring", "square", "line"]
STAGES = 4


def make_shapes(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` noisy `size` x `size` images of rings, square outlines and lines, and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    yy, xx = np.mgrid[0:size, 0:size].astype("float32")
    # per-image centre, size, angle and stroke, broadcast against the pixel grid
    cy = rng.uniform(0.3, 0.7, n)[:, None, None] * size
    cx = rng.uniform(0.3, 0.7, n)[:, None, None] * size
    radius = rng.uniform(0.15, 0.28, n)[:, None, None] * size
    angle = rng.uniform(0, np.pi, n)[:, None, None]
    stroke = rng.uniform(0.6, 1.1, n)[:, None, None] * max(1.0, size / 24)
    dy, dx = yy[None] - cy, xx[None] - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)  # coordinates along and across the angle
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    ring = np.abs(np.hypot(dx, dy) - radius) < stroke
    square = np.abs(np.maximum(np.abs(u), np.abs(v)) - radius * 0.85) < stroke
    line = (np.abs(v) < stroke) & (np.abs(u) < radius * 1.3)
    shapes = np.stack([ring, square, line], axis=1)  # (n, 3, size, size)
    images = shapes[np.arange(n), labels].astype("float32")
    images *= rng.uniform(0.6, 1.0, (n, 1, 1)).astype("float32")  # brightness
    images += rng.normal(0, 0.25, images.shape).astype("float32")  # noise
    return images[..., None], labels.astype("int32")


def build_model(size: int, width: int) -> keras.Sequential:
    """Five conv-BN-ReLU layers with two poolings, global average pooling, a dense head."""

    def conv(filters, name):
        return [keras.layers.Conv2D(filters, 3, padding="same", name=f"{name}_conv"),
                keras.layers.BatchNormalization(name=f"{name}_bn"),
                keras.layers.Activation("relu", name=f"{name}_relu")]

    return keras.Sequential(
        [keras.Input((size, size, 1), name="image")]
        + conv(width, "c1") + conv(width, "c2")
        + [keras.layers.MaxPooling2D(name="pool1")]
        + conv(2 * width, "c3") + conv(2 * width, "c4")
        + [keras.layers.MaxPooling2D(name="pool2")]
        + conv(4 * width, "c5")
        + [keras.layers.GlobalAveragePooling2D(name="gap"),
           keras.layers.Dense(4 * width, activation="relu", name="fc"),
           keras.layers.Dense(len(CLASSES), name="logits")],
        name="shapes_convnet",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train", type=int, default=6000, help="training images")
    parser.add_argument("--test", type=int, default=1000, help="validation and test images each")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=16, help="filters of the first conv layers")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b", "zb-h1"])
    args = parser.parse_args()

    devices = set_up_devices(STAGES)
    keras.utils.set_random_seed(0)
    x_train, y_train = make_shapes(args.train, args.image_size, seed=1)
    x_val, y_val = make_shapes(args.test, args.image_size, seed=2)
    x_test, y_test = make_shapes(args.test, args.image_size, seed=3)
    print(f"data: {args.train} training, {args.test} validation and {args.test} test images of "
          f"{args.image_size}x{args.image_size}, classes {CLASSES}")

    model = build_model(args.image_size, args.width)
    steps = args.epochs * -(-args.train // args.batch_size)
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, steps)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    pipe = tfpipe.Pipeline(model, stages=STAGES, devices=devices,
                           micro_batches=args.micro_batches, schedule=args.schedule)
    pipe.summary()

    history = pipe.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
                       validation_data=(x_val, y_val), verbose=verbosity())
    print("loss by epoch:", " ".join(f"{v:.4f}" for v in history.history["loss"]))
    loss, accuracy = pipe.evaluate(x_test, y_test, batch_size=args.batch_size, verbose=0)
    print(f"test loss {loss:.4f}, test accuracy {accuracy:.4f} (chance {1 / len(CLASSES):.2f})")


if __name__ == "__main__":
    main()
