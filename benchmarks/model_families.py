"""Which KerasHub models split: each family pipelined (4 stages, M = 4, 1F1B) against `model.fit`.

For every family (random init, tiny configs, no downloads, dropout 0) it trains one epoch with
plain `model.fit` and one with `tfpipe.fit` from the same seed and data, and prints the stages'
layer calls and the largest weight difference: absolute, and relative to the variable's largest
value (for variables whose largest value is at least 1e-3: a zero-initialised bias that moved by
1e-9 in both runs has no meaningful relative difference). `tests/test_keras_hub.py` runs the
same families and asserts them equal to 1e-5; `docs/models.md` records this script's table.

SGD with momentum: attention key biases get a gradient of pure rounding noise (softmax ignores a
shift shared by all keys), which Adam would scale up to full-size steps.

Usage:
    python -m benchmarks.model_families [--families gpt2,llama] [--json out/families.json]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if not __package__:  # `python benchmarks/model_families.py`: import its folder as the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import keras  # noqa: E402
import keras_hub  # noqa: E402  (pip install -e '.[hub]')
import numpy as np  # noqa: E402

VOCAB, LENGTH, BATCH = 64, 8, 16
DECODER = dict(vocabulary_size=VOCAB, num_layers=4, num_query_heads=2, num_key_value_heads=1,
               hidden_dim=16, intermediate_dim=32)


ENCODER = dict(vocabulary_size=VOCAB, num_layers=4, num_heads=2, hidden_dim=16,
               intermediate_dim=32, dropout=0.0, max_sequence_length=LENGTH)


def gpt2():
    backbone = keras_hub.models.GPT2Backbone(**ENCODER)
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)


def llama():
    return keras_hub.models.LlamaCausalLM(keras_hub.models.LlamaBackbone(**DECODER),
                                          preprocessor=None)


def llama3():
    return keras_hub.models.Llama3CausalLM(keras_hub.models.Llama3Backbone(**DECODER),
                                           preprocessor=None)


def mistral():
    backbone = keras_hub.models.MistralBackbone(**DECODER, sliding_window=4)
    return keras_hub.models.MistralCausalLM(backbone, preprocessor=None)


def gemma():
    """Tied embeddings: the input table is also the output projection, in the last stage."""
    backbone = keras_hub.models.GemmaBackbone(**DECODER, head_dim=8)
    return keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)


def qwen():
    return keras_hub.models.QwenCausalLM(keras_hub.models.QwenBackbone(**DECODER),
                                         preprocessor=None)


def mixtral():
    """Mixture of experts, top-2 of 4; the load-balancing loss is off (see test_mixtral...)."""
    backbone = keras_hub.models.MixtralBackbone(**DECODER, num_experts=4, top_k=2,
                                                router_aux_loss_coef=0.0)
    return keras_hub.models.MixtralCausalLM(backbone, preprocessor=None)


def bert():
    backbone = keras_hub.models.BertBackbone(**ENCODER)
    return keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=None,
                                               dropout=0.0)


def roberta():
    backbone = keras_hub.models.RobertaBackbone(**ENCODER)
    return keras_hub.models.RobertaTextClassifier(backbone, num_classes=3, preprocessor=None,
                                                  dropout=0.0)


def vit():
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(16, 16, 3), patch_size=4, num_layers=4, num_heads=2, hidden_dim=16,
        mlp_dim=32)
    return keras_hub.models.ViTImageClassifier(backbone, num_classes=3, preprocessor=None)


def data(kind: str, n: int = 2 * BATCH):
    rng = np.random.default_rng(1)
    if kind == "image":
        return rng.normal(size=(n, 16, 16, 3)).astype("float32"), rng.integers(0, 3, n)
    ids = rng.integers(1, VOCAB, size=(n, LENGTH + 1)).astype("int32")
    mask = np.ones((n, LENGTH), "int32")
    mask[: n // 2, -2:] = 0  # some padding
    if kind == "causal":
        return {"token_ids": ids[:, :-1], "padding_mask": mask}, ids[:, 1:]
    x = {"token_ids": ids[:, :-1], "padding_mask": mask}
    if kind == "bert":
        x["segment_ids"] = np.zeros((n, LENGTH), "int32")
    return x, rng.integers(0, 3, n)


FAMILIES = {
    "gpt2": (gpt2, "causal"), "llama": (llama, "causal"), "llama3": (llama3, "causal"),
    "mistral": (mistral, "causal"), "gemma": (gemma, "causal"), "qwen": (qwen, "causal"),
    "mixtral": (mixtral, "causal"), "bert": (bert, "bert"), "roberta": (roberta, "roberta"),
    "vit": (vit, "image"),
}


def make(factory: Any) -> Any:
    keras.utils.set_random_seed(0)
    model = factory()
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  weighted_metrics=[])
    return model


RELATIVE_FLOOR = 1e-3
"""Relative differences are of variables whose largest value is at least this."""


def compare(family: str) -> dict[str, Any]:
    """One family: `model.fit` and `tfpipe.fit` from the same seed; stages and differences."""
    import tfpipe

    factory, kind = FAMILIES[family]
    x, y = data(kind)
    ref = make(factory)
    ref_hist = ref.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    model = make(factory)
    history = tfpipe.fit(model, x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                         stages=4, micro_batches=4, schedule="1f1b")
    abs_diff = rel_diff = 0.0
    for a, b in zip(model.weights, ref.weights):
        d = float(np.max(np.abs(a.numpy() - b.numpy())))
        abs_diff = max(abs_diff, d)
        scale = float(np.max(np.abs(b.numpy())))
        if scale >= RELATIVE_FLOOR:  # zero-initialised biases that barely moved: abs only
            rel_diff = max(rel_diff, d / scale)
    return {
        "family": family, "model": type(model).__name__,
        "stages": [st.names for st in history.pipeline.stages],
        "loss": history.history["loss"][-1], "reference_loss": ref_hist.history["loss"][-1],
        "max_abs_diff": abs_diff, "max_rel_diff": rel_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import tfpipe

    tfpipe.configure_cpu_devices(4)
    from benchmarks.speed_table import write_json
    from tfpipe.report import text_table

    results = [compare(f) for f in args.families.split(",")]
    rows = [["family", "task model", "stage 0 .. stage 3 (first call of each)", "max abs diff",
             "max rel diff"]]
    for r in results:
        firsts = ", ".join(names[0].split("/")[-1] for names in r["stages"])
        rows.append([r["family"], r["model"], firsts, f"{r['max_abs_diff']:.1e}",
                     f"{r['max_rel_diff']:.1e}"])
    print("4 stages, M = 4, 1F1B, one epoch of 32 samples (batch 16) vs model.fit, same seed")
    print("\n".join(text_table(rows, {3, 4})))
    write_json(args.json, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
