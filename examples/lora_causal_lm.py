"""LoRA fine-tuning of a KerasHub causal LM, its backbone cut into 4 pipeline stages.

What it shows:
- a KerasHub task model (`LlamaCausalLM`, random init, a tiny config: nothing is downloaded)
  whose backbone is a nested Functional model: tfpipe reads through it and cuts between its
  transformer layers (the stage table names them `llama_backbone/transformer_layer_1` ...);
- first a short full training on one slice of text ("pre-training"), then
  `backbone.enable_lora(rank=4)` and fine-tuning on another slice: only the LoRA matrices
  train; the frozen weights stay on their stage's device with no gradient buffers and no
  optimizer slots (the script prints both counts);
- the model is saved as a `.keras` file and reloaded, LoRA weights included.

The text is Python's standard library source, read character by character (the vocabulary of
`examples/gpt.py`): the pre-training slice is modules starting a-m, the fine-tuning slice
modules n-z.

Devices: 4 GPUs when there are some (one GPU is split into 4 logical GPUs), else 4 logical
CPU devices.

Run:
    python examples/lora_causal_lm.py                 # default run, about 2 minutes
    python examples/lora_causal_lm.py --pretrain-steps 4 --finetune-steps 4 --chars 40000
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from example_setup import set_up_devices, verbosity  # noqa: E402
from gpt import INDEX, VOCAB, read_corpus  # noqa: E402

import tfpipe  # noqa: E402

DEVICES = 4


def windows(text: str, seq_len: int, batch_size: int) -> tf.data.Dataset:
    """(token_ids, padding_mask) -> next-character targets, repeated, in batches."""
    ids = np.array([INDEX[c] for c in text], dtype="int32")
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1 : n * seq_len + 1].reshape(n, seq_len)
    inputs = {"token_ids": x, "padding_mask": np.ones_like(x)}
    data = tf.data.Dataset.from_tensor_slices((inputs, y)).shuffle(n, seed=0).repeat()
    return data.batch(batch_size, drop_remainder=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=400_000, help="characters of each slice")
    parser.add_argument("--pretrain-steps", type=int, default=60)
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--out", default=".", help="folder for lora_causal_lm.keras")
    args = parser.parse_args()

    devices = set_up_devices(DEVICES)
    import keras_hub  # after the devices are set up

    keras.utils.set_random_seed(0)
    corpus = read_corpus(4 * args.chars)
    half = len(corpus) // 2
    pretrain = windows(corpus[: min(half, args.chars)], args.seq_len, args.batch_size)
    finetune = windows(corpus[half : half + args.chars], args.seq_len, args.batch_size)

    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=len(VOCAB), num_layers=args.layers, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=args.dim, intermediate_dim=2 * args.dim)
    model = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    options = dict(stages=DEVICES, devices=devices, micro_batches=args.micro_batches,
                   schedule="1f1b", shuffle=False, verbose=verbosity())

    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss, weighted_metrics=[])
    history = tfpipe.fit(model, pretrain, epochs=1, steps_per_epoch=args.pretrain_steps,
                         **options)
    history.pipeline.summary()
    print(f"pre-training loss {history.history['loss'][-1]:.4f}")

    backbone.enable_lora(rank=args.rank)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss, weighted_metrics=[])
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    total = sum(int(np.prod(v.shape)) for v in model.weights)
    history = tfpipe.fit(model, finetune, epochs=2, steps_per_epoch=args.finetune_steps // 2,
                         **options)
    slots = len(model.optimizer.variables) - 2  # less the step counter and learning rate
    print(f"LoRA rank {args.rank}: {trainable:,} of {total:,} parameters train "
          f"({len(model.trainable_variables)} variables, {slots} optimizer slots)")
    print("loss by epoch:", " ".join(f"{v:.4f}" for v in history.history["loss"]))

    path = os.path.join(args.out, "lora_causal_lm.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    batch = next(iter(finetune))[0]
    same = np.allclose(reloaded(batch), model(batch), atol=1e-5)
    print(f"saved {path}; reloaded model gives the same logits: {same}")


if __name__ == "__main__":
    main()
