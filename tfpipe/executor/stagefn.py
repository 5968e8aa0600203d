"""Stage functions: each stage's forward traced once per input signature, called per micro-batch.

Design:
- Tracing a pipelined step used to trace every forward action as a fresh copy of its stage's
  layers: M x K copies, and M x K copies again for the backward. Here each stage's forward is
  one `tf.function` per training flag (and input signature), called once per micro-batch; the
  per-stage tapes differentiate the call through the one gradient function TensorFlow makes
  for it. The dense weight-gradient sums are one call per stage and micro-batch too
  (`tfpipe.executor.grads`). Measured on a 12-block Transformer (width 64, sequence 32,
  K = 4, 1F1B, 2 CPU cores, `benchmarks/trace_cost.py`; figures in docs/benchmarks.md): at
  M = 8 the traced step went from 53,467 operations to 1,723 and its trace from 16.4 s to
  3.6 s; at M = 32 from 211,915 to 4,363, and the first step from 185 s to 22 s.
- The calls are not inlined (`_noinline`): inlined, TensorFlow's runtime expands them back
  into M x K copies before the first step runs, and optimising that graph took longer than
  tracing it had: the first run at M = 8 took 16.4 s with inlined calls, 4.4 s without.
  Steady steps at M = 32 were 3-7 % slower than before stage functions (side by side,
  docs/benchmarks.md): the price of 3 x M x K calls per step that are not inlined.
- A tensor made inside a function cannot be used outside it, so the function returns all a
  step needs of the call: the stage's outputs, its `add_loss` terms, and, with deferred
  BatchNorm, its layers' moments (`DeferredBatchNorm.collect`), re-paired with their layers
  from what the trace recorded.
- `check_numerics` calls layers one by one (to name the first layer that makes a NaN) and
  subclassed models trained whole are called directly: neither is a stage function.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from tfpipe.executor.batchnorm import DeferredBatchNorm, collecting
from tfpipe.partition import Stage

Records = list[tuple[int, Any]]
"""`(id(layer), (mean, variance, count))` per BatchNormalization call (deferred mode)."""


class StageFunctions:
    """The forward functions of a pipeline's stages.

    Args:
        deferred: the pipeline's deferred BatchNormalization layers, or None.
    """

    def __init__(self, deferred: DeferredBatchNorm | None) -> None:
        self.deferred = deferred
        self._functions: dict[tuple[int, bool], Any] = {}
        self._moment_layers: dict[tuple[int, bool], list[int]] = {}

    def __call__(
        self, stage: Stage, inputs: list[Any], training: bool
    ) -> tuple[list[Any], list[Any], Records]:
        """Runs `stage`'s forward on one micro-batch's `inputs` (on the caller's device).

        Returns:
            The stage's outputs (flat, in `stage.outputs` order), its `add_loss` terms, and
            its BatchNormalization moments (empty unless deferred).
        """
        key = (stage.index, training)
        if key not in self._functions:
            self._functions[key] = self._build(stage, training, key)
        outs, losses, moments = self._functions[key](inputs)
        layers = self._moment_layers[key]
        records = [(layer, tuple(moments[3 * j : 3 * j + 3])) for j, layer in enumerate(layers)]
        return list(outs), list(losses), records

    def tracing_counts(self) -> dict[tuple[int, bool], int]:
        """How many times each `(stage index, training)` function was traced."""
        return {k: f.experimental_get_tracing_count() for k, f in self._functions.items()}

    def _build(self, stage: Stage, training: bool, key: tuple[int, bool]) -> Any:
        def forward(inputs: list[Any]) -> tuple[list[Any], list[Any], list[Any]]:
            with collecting(self.deferred) as got:
                outs = keras.tree.flatten(stage.model(inputs, training=training))
            self._moment_layers[key] = [layer for layer, _ in got]
            return outs, list(stage.model.losses), [t for _, ms in got for t in ms]

        return tf.function(forward, autograph=False, reduce_retracing=True,
                           experimental_attributes={"_noinline": True})
