"""Reliability, property-based: for random small models and pipeline settings, one epoch of
`tfpipe.fit` equals one epoch of plain `model.fit`, step by step.

Hypothesis draws Sequential or Functional models of 2 to 6 Dense layers with random widths and
activations (Functional ones may add residual `Add` connections, which become layer calls a
stage can start or end at), a stage count from 1 to min(4, layer calls), 1 to 4 micro-batches
and a schedule from gpipe / 1f1b / zb-h1. Plain SGD is used: Adam divides by the square root
of tiny second moments, which turns float-rounding differences in near-zero gradients into
visible weight differences that say nothing about the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import tfpipe
from tests.models import StepLog, assert_same_training

# Each example traces a pipelined and a plain Keras step (about 0.5 s on 2 CPU cores), so 25
# examples per test keep the file well under a minute. derandomize: the same examples every run.
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)
IN, CLASSES, N, BATCH = 6, 3, 32, 8  # 4 steps of 8 samples


@dataclass(frozen=True)
class Spec:
    functional: bool
    widths: tuple[int, ...]            # hidden widths; the output layer (CLASSES) comes after
    activations: tuple[str | None, ...]
    residual: tuple[bool, ...]         # per hidden layer: x + Dense(x) (same width as x)
    stages: int
    micro_batches: int
    schedule: str
    seed: int

    @property
    def layer_calls(self) -> int:
        return len(self.widths) + 1 + sum(self.residual)


@st.composite
def specs(draw, functional: bool) -> Spec:
    hidden = draw(st.integers(min_value=1, max_value=5))  # + the output layer: 2..6 Dense
    widths, residual = [], []
    previous = IN
    for _ in range(hidden):
        res = functional and draw(st.booleans())
        width = previous if res else draw(st.integers(min_value=2, max_value=12))
        widths.append(width)
        residual.append(res)
        previous = width
    activations = tuple(draw(st.sampled_from(["relu", "tanh", None])) for _ in range(hidden))
    calls = hidden + 1 + sum(residual)
    return Spec(
        functional=functional,
        widths=tuple(widths),
        activations=activations,
        residual=tuple(residual),
        stages=draw(st.integers(min_value=1, max_value=min(4, calls))),
        micro_batches=draw(st.integers(min_value=1, max_value=4)),
        schedule=draw(st.sampled_from(["gpipe", "1f1b", "zb-h1"])),
        seed=draw(st.integers(min_value=0, max_value=2**16)),
    )


def make(spec: Spec) -> keras.Model:
    keras.utils.set_random_seed(spec.seed)
    inputs = keras.Input((IN,))
    if spec.functional:
        h = inputs
        for width, act, res in zip(spec.widths, spec.activations, spec.residual):
            out = keras.layers.Dense(width, activation=act)(h)
            h = keras.layers.Add()([h, out]) if res else out
        model = keras.Model(inputs, keras.layers.Dense(CLASSES)(h))
    else:
        model = keras.Sequential(
            [inputs]
            + [keras.layers.Dense(w, activation=a) for w, a in zip(spec.widths, spec.activations)]
            + [keras.layers.Dense(CLASSES)]
        )
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def check(spec: Spec) -> None:
    rng = np.random.default_rng(spec.seed)
    x = rng.normal(size=(N, IN)).astype("float32")
    y = rng.integers(0, CLASSES, size=N)
    fit = dict(batch_size=BATCH, epochs=1, shuffle=False, verbose=0)

    ref, ref_log = make(spec), StepLog()
    ref.fit(x, y, callbacks=[ref_log], **fit)

    model, log = make(spec), StepLog()
    pipe = tfpipe.Pipeline(model, stages=spec.stages, micro_batches=spec.micro_batches,
                           schedule=spec.schedule)
    assert len(pipe.stages) == spec.stages
    pipe.fit(x, y, callbacks=[log], **fit)

    assert len(log.batches) == N // BATCH
    assert_same_training(ref, ref_log, model, log, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(spec=specs(functional=False))
def test_random_sequential_pipelined_equals_model_fit(spec: Spec):
    check(spec)


@SETTINGS
@given(spec=specs(functional=True))
def test_random_functional_pipelined_equals_model_fit(spec: Spec):
    check(spec)
