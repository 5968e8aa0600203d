"""Train a character-level Transformer language model pipelined across 4 devices.

The text is Python's own standard library source (found with `sysconfig`, nothing is
downloaded). The model is split into 4 stages, one per device: GPUs when there are some
(one GPU is split into 4 logical GPUs), else 4 logical CPU devices. It prints the stage
table, Keras's progress bar, tokens per second, and then samples some Python-like text.

Run: `make demo`, or `python examples/char_transformer.py --epochs 1 --steps-per-epoch 20`.
"""

from __future__ import annotations

import argparse
import os
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfpipe  # noqa: E402

STAGES = 4


def set_up_devices(stages: int) -> None:
    """4 devices: the GPUs, one GPU split into logical GPUs, or logical CPUs."""
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) == 1:
        tf.config.set_logical_device_configuration(
            gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=4096)] * stages
        )
    elif not gpus:
        tfpipe.configure_cpu_devices(stages)


def read_corpus(max_chars: int) -> str:
    """Concatenated standard-library sources, printable ASCII only."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        text = "".join(c if 32 <= ord(c) < 127 or c == "\n" else "?" for c in text)
        chunks.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(chunks)[:max_chars]


VOCAB = ["\n"] + [chr(i) for i in range(32, 127)]
INDEX = {c: i for i, c in enumerate(VOCAB)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=200)
    parser.add_argument("--chars", type=int, default=600_000)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--generate", type=int, default=240, help="characters to sample")
    parser.add_argument("--out", default="out", help="where the trained .keras file goes")
    args = parser.parse_args()

    set_up_devices(STAGES)
    import keras
    from char_model import build_model

    keras.utils.set_random_seed(0)
    text = read_corpus(args.chars)
    ids = np.array([INDEX[c] for c in text], dtype="int32")
    n = (len(ids) - 1) // args.seq_len
    x = ids[: n * args.seq_len].reshape(n, args.seq_len)
    y = ids[1 : n * args.seq_len + 1].reshape(n, args.seq_len)
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(n, seed=0)
        .batch(args.batch_size, drop_remainder=True)
        .repeat()
        .prefetch(2)
    )
    print(f"corpus: {len(text):,} characters of Python's standard library, {n:,} sequences "
          f"of {args.seq_len}")

    model = build_model(len(VOCAB), args.seq_len)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    pipe = tfpipe.Pipeline(model, stages=STAGES, micro_batches=args.micro_batches,
                           devices=tfpipe.default_devices()[:STAGES])
    pipe.summary()

    tokens_per_step = args.batch_size * args.seq_len

    class Throughput(keras.callbacks.Callback):
        """Tokens per second over each epoch, from the end of its first step (after tracing)."""

        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.start
            tokens = tokens_per_step * (args.steps_per_epoch - 1)
            print(f"epoch {epoch + 1}: {tokens / seconds:,.0f} tokens/s, loss {logs['loss']:.3f}")

    pipe.fit(dataset, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, shuffle=False,
             callbacks=[Throughput()], verbose=2 if os.environ.get("CI") else "auto")

    out = Path(args.out)
    out.mkdir(exist_ok=True)
    model.save(out / "char_transformer.keras")
    print(f"saved the trained model to {out / 'char_transformer.keras'}")
    print("--- sampled text ---")
    print(sample(model, "def ", args.generate, args.seq_len))


def sample(model, prompt: str, length: int, seq_len: int, temperature: float = 0.7) -> str:
    """Samples `length` characters after `prompt`, one at a time."""
    rng = np.random.default_rng(0)

    @tf.function(reduce_retracing=True)
    def next_logits(window):
        return model(window, training=False)[:, -1, :]

    chars = [INDEX[c] for c in prompt]
    for _ in range(length):
        window = np.array(chars[-seq_len:], dtype="int32")
        window = np.pad(window, (seq_len - len(window), 0))[None, :]
        logits = next_logits(tf.constant(window)).numpy()[0] / temperature
        probs = np.exp(logits - logits.max())
        chars.append(int(rng.choice(len(VOCAB), p=probs / probs.sum())))
    return "".join(VOCAB[i] for i in chars)


if __name__ == "__main__":
    main()
