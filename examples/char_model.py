"""A small decoder-only Transformer (Functional Keras model of custom layers) for the demo."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="tfpipe_examples")
class TokenAndPosition(keras.layers.Layer):
    """Token embedding plus a learned position embedding: (B, T) int -> (B, T, D)."""

    def __init__(self, vocab: int, seq_len: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.vocab, self.seq_len, self.dim = vocab, seq_len, dim
        self.tokens = keras.layers.Embedding(vocab, dim)
        self.positions = keras.layers.Embedding(seq_len, dim)

    def call(self, ids):
        steps = keras.ops.arange(keras.ops.shape(ids)[-1])
        return self.tokens(ids) + self.positions(steps)

    def get_config(self):
        return {
            **super().get_config(),
            "vocab": self.vocab,
            "seq_len": self.seq_len,
            "dim": self.dim,
        }


@keras.saving.register_keras_serializable(package="tfpipe_examples")
class Block(keras.layers.Layer):
    """Pre-norm causal self-attention and MLP, each with a residual: (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, heads: int, hidden: int, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.heads, self.hidden = dim, heads, hidden
        self.norm1 = keras.layers.LayerNormalization()
        self.attention = keras.layers.MultiHeadAttention(heads, dim // heads)
        self.norm2 = keras.layers.LayerNormalization()
        self.up = keras.layers.Dense(hidden, activation="gelu")
        self.down = keras.layers.Dense(dim)

    def call(self, x):
        h = self.norm1(x)
        x = x + self.attention(h, h, use_causal_mask=True)
        return x + self.down(self.up(self.norm2(x)))

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "heads": self.heads, "hidden": self.hidden}


def build_model(
    vocab: int, seq_len: int, dim: int = 128, heads: int = 4, blocks: int = 4
) -> keras.Model:
    """Functional chain: embedding, `blocks` Transformer blocks, norm, logits (B, T, vocab)."""
    ids = keras.Input((seq_len,), dtype="int32", name="ids")
    h = TokenAndPosition(vocab, seq_len, dim, name="embed")(ids)
    for i in range(blocks):
        h = Block(dim, heads, 2 * dim, name=f"block_{i}")(h)
    h = keras.layers.LayerNormalization(name="final_norm")(h)
    logits = keras.layers.Dense(vocab, name="logits")(h)
    return keras.Model(ids, logits, name="char_transformer")
