"""The steady loop (`tfpipe.executor.steadyloop`): a schedule's steady phase traced once, as one
in-graph loop over all devices, equals `model.fit`; its graph grows with K, not with M."""

from __future__ import annotations

import numpy as np
import pytest

import tfpipe
from tests.models import StepLog, assert_same_training, build, data
from tests.test_rank_loops import skip_model


def fit_both(make, x, y, batch_size=16, sample_weight=None, **pipeline):
    """`model.fit` and `tfpipe.fit(rank_loops="steady")` on fresh copies of one model."""
    ref, ref_log = make(), StepLog()
    ref.fit(x, y, sample_weight=sample_weight, batch_size=batch_size, epochs=2, shuffle=False,
            verbose=0, callbacks=[ref_log])
    model, log = make(), StepLog()
    history = tfpipe.fit(model, x, y, sample_weight=sample_weight, batch_size=batch_size,
                         epochs=2, shuffle=False, verbose=0, callbacks=[log],
                         rank_loops="steady", **pipeline)
    loops = history.pipeline.executor.loops
    assert type(loops).__name__ == "SteadyLoop", "the steady loop did not run"
    return ref, ref_log, model, log, loops


@pytest.mark.parametrize("kind,opt,stages,micro_batches,schedule", [
    ("mlp", "adam", 2, 4, "1f1b"),
    ("functional", "sgd", 4, 8, "1f1b"),
    ("cnn", "adam", 2, 4, "1f1b"),
    ("deep", "sgd", 4, 6, "1f1b"),  # Adam: see test_schedule_execution
])
def test_steady_loop_equals_keras(kind, opt, stages, micro_batches, schedule):
    x, y = data(kind)
    ref, ref_log, model, log, _ = fit_both(lambda: build(kind, opt), x, y, stages=stages,
                                           micro_batches=micro_batches, schedule=schedule)
    assert_same_training(ref, ref_log, model, log)


def test_skips_sparse_gradients_losses_sample_weights_and_a_short_last_batch():
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 20, (46, 6)).astype("int32"), rng.integers(0, 3, 46)
    weights = rng.uniform(0.5, 2.0, 46).astype("float32")
    # 46 = 2 x 16 + 14: the last batch's 6 micro-batches hold 3, 3, 2, 2, 2, 2 samples
    ref, ref_log, model, log, _ = fit_both(skip_model, x, y, sample_weight=weights,
                                           split_points=["mid", "mid2", "join"],
                                           micro_batches=6, schedule="1f1b")
    assert_same_training(ref, ref_log, model, log)
