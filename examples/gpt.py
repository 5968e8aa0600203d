"""A small GPT language model with tied embeddings, interleaved schedule and recomputation.

What it shows:
- a decoder-only Transformer written as custom Keras layers (`CausalSelfAttention` with an
  explicit causal mask, pre-norm `GPTBlock`s with a GELU MLP) in a Functional model;
- tied input/output embeddings: the token `Embedding` is called in the first stage and its
  table is used again, transposed, by `TiedLogits` in the last stage. tfpipe keeps one
  variable (on the first stage's device) and sums the two stages' gradients for it;
- `schedule="interleaved"` with `chunks=2` on 2 devices: the model is cut into 4 pieces and
  device 0 holds pieces 0 and 2, device 1 pieces 1 and 3 (a smaller bubble than 1F1B);
  `--schedule zb-h1` runs the zero-bubble schedule on 2 pieces instead;
- `recompute="except_last"`: every piece but the last keeps only its inputs per in-flight
  micro-batch and runs its forward again in its backward.

The text is Python's own standard library source, found with `sysconfig` (nothing is
downloaded), read character by character. After training it samples a few lines of
Python-like text from prompts such as "def " and "import ".

Devices: 2 GPUs when there are some (one GPU is split into 2 logical GPUs), else 2 logical
CPU devices.

Run:
    python examples/gpt.py                                   # default run, about 3 minutes
    python examples/gpt.py --epochs 2 --steps-per-epoch 5 --dim 32 --layers 2   # seconds
"""

from __future__ import annotations

import argparse
import math
import os
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from example_setup import set_up_devices, verbosity  # noqa: E402

import tfpipe  # noqa: E402

DEVICES = 2
VOCAB = ["\n"] + [chr(i) for i in range(32, 127)]  # printable ASCII and newline
INDEX = {c: i for i, c in enumerate(VOCAB)}


@keras.saving.register_keras_serializable(package="tfpipe_examples")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned position vector to each time step: (B, T, D) -> (B, T, D)."""

    def __init__(self, max_len: int, **kwargs):
        super().__init__(**kwargs)
        self.max_len = max_len

    def build(self, input_shape):
        self.table = self.add_weight(shape=(self.max_len, input_shape[-1]),
                                     initializer=keras.initializers.RandomNormal(stddev=0.02),
                                     name="table")

    def call(self, x):
        return x + self.table[: keras.ops.shape(x)[1]]

    def get_config(self):
        return {**super().get_config(), "max_len": self.max_len}


@keras.saving.register_keras_serializable(package="tfpipe_examples")
class CausalSelfAttention(keras.layers.Layer):
    """Multi-head self-attention where position t attends to positions <= t only."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.qkv = keras.layers.Dense(3 * dim, name="qkv")
        self.proj = keras.layers.Dense(dim, name="proj")
        self.drop = keras.layers.Dropout(dropout)

    def call(self, x, training=None):
        ops = keras.ops
        t, head_dim = ops.shape(x)[1], self.dim // self.heads
        q, k, v = ops.split(self.qkv(x), 3, axis=-1)

        def heads(a):  # (B, T, D) -> (B, H, T, D/H)
            return ops.transpose(ops.reshape(a, (-1, t, self.heads, head_dim)), (0, 2, 1, 3))

        q, k, v = heads(q), heads(k), heads(v)
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / math.sqrt(head_dim)
        causal = ops.tril(ops.ones((t, t), dtype="bool"))  # row t: True for keys 0..t
        scores = ops.where(causal, scores, ops.full_like(scores, -1e9))
        weights = self.drop(ops.softmax(scores, axis=-1), training=training)
        out = ops.reshape(ops.transpose(ops.matmul(weights, v), (0, 2, 1, 3)), (-1, t, self.dim))
        return self.proj(out)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "heads": self.heads,
                "dropout": self.dropout}


@keras.saving.register_keras_serializable(package="tfpipe_examples")
class GPTBlock(keras.layers.Layer):
    """Pre-norm block: x + attention(norm(x)), then x + MLP(norm(x)) with a 4x GELU MLP."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.norm1 = keras.layers.LayerNormalization(epsilon=1e-5, name="norm1")
        self.attention = CausalSelfAttention(dim, heads, dropout, name="attention")
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-5, name="norm2")
        self.up = keras.layers.Dense(4 * dim, activation="gelu", name="up")
        self.down = keras.layers.Dense(dim, name="down")
        self.drop = keras.layers.Dropout(dropout)

    def call(self, x, training=None):
        x = x + self.drop(self.attention(self.norm1(x), training=training), training=training)
        return x + self.drop(self.down(self.up(self.norm2(x))), training=training)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "heads": self.heads,
                "dropout": self.dropout}


class TiedLogits(keras.layers.Layer):
    """Output projection that reuses the token embedding's table: (B, T, D) -> (B, T, vocab).

    It owns only a bias; the (vocab, D) table is the input `Embedding`'s own variable.
    """

    def __init__(self, embedding: keras.layers.Embedding, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding

    def build(self, input_shape):
        self.bias = self.add_weight(shape=(self.embedding.input_dim,), initializer="zeros",
                                    name="bias")

    def call(self, h):
        return keras.ops.matmul(h, keras.ops.transpose(self.embedding.embeddings)) + self.bias


def build_model(seq_len: int, dim: int, heads: int, layers: int, dropout: float) -> keras.Model:
    ids = keras.Input((seq_len,), dtype="int32", name="ids")
    embed = keras.layers.Embedding(
        len(VOCAB), dim, embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02),
        name="token_embed")
    h = PositionEmbedding(seq_len, name="position_embed")(embed(ids))
    for i in range(layers):
        h = GPTBlock(dim, heads, dropout, name=f"block_{i}")(h)
    h = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(h)
    logits = TiedLogits(embed, name="tied_logits")(h)
    return keras.Model(ids, logits, name="gpt")


def read_corpus(max_chars: int) -> str:
    """Standard-library sources (printable ASCII), concatenated up to `max_chars`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        text = "".join(c if c in INDEX else "?" for c in text.replace("\t", "    "))
        chunks.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(chunks)[:max_chars]


def sample(model, prompt: str, length: int, seq_len: int, temperature: float, seed: int) -> str:
    """`length` characters sampled after `prompt`, one at a time, from the trained model."""
    rng = np.random.default_rng(seed)

    @tf.function(reduce_retracing=True)
    def logits_at(window, position):
        return model(window, training=False)[0, position]

    chars = [INDEX[c] for c in prompt]
    for _ in range(length):
        window = chars[-seq_len:]
        position = len(window) - 1
        window = np.array(window + [0] * (seq_len - len(window)), dtype="int32")[None]
        logits = logits_at(tf.constant(window), tf.constant(position)).numpy() / temperature
        probs = np.exp(logits - logits.max())
        chars.append(int(rng.choice(len(VOCAB), p=probs / probs.sum())))
    return "".join(VOCAB[i] for i in chars)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=120)
    parser.add_argument("--chars", type=int, default=1_000_000, help="characters of text")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4, help="Transformer blocks")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--schedule", default="interleaved", choices=["interleaved", "zb-h1"])
    parser.add_argument("--recompute", default="except_last",
                        choices=["never", "except_last", "always"])
    parser.add_argument("--samples", type=int, default=3, help="prompts to sample from")
    parser.add_argument("--generate", type=int, default=160, help="characters per sample")
    parser.add_argument("--temperature", type=float, default=0.6)
    args = parser.parse_args()

    devices = set_up_devices(DEVICES)
    keras.utils.set_random_seed(0)
    text = read_corpus(args.chars)
    ids = np.array([INDEX[c] for c in text], dtype="int32")
    split = int(len(ids) * 0.95)

    def windows(part: np.ndarray, shuffle: bool) -> tf.data.Dataset:
        n = (len(part) - 1) // args.seq_len
        x = part[: n * args.seq_len].reshape(n, args.seq_len)
        y = part[1 : n * args.seq_len + 1].reshape(n, args.seq_len)
        data = tf.data.Dataset.from_tensor_slices((x, y))
        if shuffle:
            data = data.shuffle(n, seed=0).repeat()
        return data.batch(args.batch_size, drop_remainder=True).prefetch(2)

    train, val = windows(ids[:split], shuffle=True), windows(ids[split:], shuffle=False)
    print(f"corpus: {len(text):,} characters of Python's standard library "
          f"({split:,} for training, {len(text) - split:,} held out), vocabulary {len(VOCAB)}")

    model = build_model(args.seq_len, args.dim, args.heads, args.layers, args.dropout)
    steps = args.epochs * args.steps_per_epoch
    model.compile(
        optimizer=keras.optimizers.AdamW(
            keras.optimizers.schedules.CosineDecay(0.0, steps, warmup_target=3e-3,
                                                   warmup_steps=max(1, steps // 20)),
            weight_decay=0.01, global_clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    # interleaved: 2 devices x 2 chunks = 4 pieces; zb-h1: 2 pieces, one per device
    chunks = 2 if args.schedule == "interleaved" else None
    pipe = tfpipe.Pipeline(model, stages=DEVICES, devices=devices, chunks=chunks,
                           micro_batches=args.micro_batches, schedule=args.schedule,
                           recompute=args.recompute)
    pipe.summary()
    table = model.get_layer("token_embed").embeddings
    users = [s.index for s in pipe.stages
             if any(layer.name in ("token_embed", "tied_logits") for layer in s.layers)]
    print(f"tied embedding {tuple(table.shape)} on {table.value.device}, used by stages "
          f"{users[0]} and {users[-1]}; recompute per stage: {pipe.recompute}")

    class Throughput(keras.callbacks.Callback):
        """Characters per second over each epoch, from the end of its first step (after tracing)."""

        def on_train_batch_end(self, batch, logs=None):
            self.end = time.perf_counter()
            if batch == 0:
                self.start = self.end

        def on_epoch_end(self, epoch, logs=None):
            chars = args.batch_size * args.seq_len * (args.steps_per_epoch - 1)
            speed = chars / max(self.end - self.start, 1e-9)
            print(f"epoch {epoch + 1}: {speed:,.0f} training chars/s, loss {logs['loss']:.3f}, "
                  f"held-out loss {logs['val_loss']:.3f}")

    history = pipe.fit(train, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                       validation_data=val, callbacks=[Throughput()], shuffle=False,
                       verbose=verbosity())
    print("loss by epoch:", " ".join(f"{v:.4f}" for v in history.history["loss"]))
    val_loss = history.history["val_loss"][-1]
    print(f"held-out loss {val_loss:.4f} nats/char, perplexity {math.exp(val_loss):.2f} "
          f"(guessing uniformly: {len(VOCAB)})")

    print("--- sampled text ---")
    for i, prompt in enumerate(["def ", "import ", "class ", "    if ", "for "][: args.samples]):
        text = sample(model, prompt, args.generate, args.seq_len, args.temperature, seed=i)
        print("\n".join(line.rstrip() for line in text.splitlines()[:4]))
        print("---")


if __name__ == "__main__":
    main()
