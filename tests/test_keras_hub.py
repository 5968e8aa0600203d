"""KerasHub task models (a backbone nested in a CausalLM or classifier) split inside the backbone
and train exactly like `model.fit`: 4 stages, 4 micro-batches, 1F1B, one epoch.

The families (random init, tiny configs, no downloads, dropout 0: a dropout mask per
micro-batch cannot equal one per batch) are `benchmarks/model_families.py`'s, whose table of
measured differences is in docs/models.md.
"""

from __future__ import annotations

import keras
import pytest

import tfpipe
from benchmarks.model_families import BATCH, FAMILIES, data, gemma, make
from tests.models import StepLog, assert_same_training
from tfpipe.placement import device_of


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_keras_hub_task_splits_inside_its_backbone_and_equals_fit(family):
    factory, kind = FAMILIES[family]
    x, y = data(kind)
    ref, ref_log = make(factory), StepLog()
    ref.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = make(factory), StepLog()
    history = tfpipe.fit(model, x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                         callbacks=[log], stages=4, micro_batches=4, schedule="1f1b")
    assert_same_training(ref, ref_log, model, log, batch_size=BATCH)
    stages = history.pipeline.stages
    backbone = model.backbone.name
    # the cuts fall inside the backbone: every stage of a decoder runs backbone layers; ViT's
    # backbone is two calls (patching, then one ViTEncoder layer holding every block)
    inside = [any(n.startswith(backbone + "/") for n in st.names) for st in stages]
    assert sum(inside) == (2 if family == "vit" else 4), [st.names for st in stages]
    assert len({st.device for st in stages}) == 4


def test_gemma_tied_embedding_is_one_variable_on_the_first_stage():
    x, y = data("causal")
    model = make(gemma)
    history = tfpipe.fit(model, x, y, batch_size=BATCH, epochs=1, verbose=0, stages=4,
                         micro_batches=4, schedule="1f1b")
    first, last = history.pipeline.stages[0], history.pipeline.stages[-1]
    table = model.backbone.token_embedding.embeddings
    assert any(v is table for v in first.model.weights)
    assert any(v is table for v in last.model.weights)  # the output projection uses it too
    assert last.shared_from[id(table)] == 0
    assert device_of(table) == first.device
    assert sum(1 for v in model.weights if v is table) == 1


def test_lora_fine_tuning_trains_only_lora_weights_and_equals_fit():
    def lora_llama():
        model = FAMILIES["llama"][0]()
        model.backbone.enable_lora(rank=4)
        return model

    def make_lora():
        keras.utils.set_random_seed(0)
        model = lora_llama()
        model.compile(optimizer=keras.optimizers.Adam(0.01),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      weighted_metrics=[])
        return model

    x, y = data("causal")
    ref, ref_log = make_lora(), StepLog()
    ref.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = make_lora(), StepLog()
    history = tfpipe.fit(model, x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                         callbacks=[log], stages=4, micro_batches=4, schedule="1f1b")
    assert_same_training(ref, ref_log, model, log, batch_size=BATCH)
    trainable = model.trainable_variables
    assert trainable and all("lora_kernel" in v.path for v in trainable), [v.path for v in trainable]
    # frozen weights sit on their stage and have no optimizer slots; LoRA ones have Adam's two
    slots = {id(v) for v in model.optimizer.variables}
    assert len(model.optimizer.variables) == 2 + 2 * len(trainable)
    for st in history.pipeline.stages:
        for layer in st.layers:
            own = [v for v in layer.weights if id(v) not in st.shared_from]
            assert {device_of(v) for v in own} <= {st.device}, layer.name
        frozen = [v for v in st.model.weights if not v.trainable]
        assert frozen and not any(id(v) in slots for v in frozen)
        assert len(st.trainable_variables) == sum("lora_kernel" in v.path for v in st.model.weights)
