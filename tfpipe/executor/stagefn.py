"""Stage functions: each stage's forward traced once per input signature, called per micro-batch.

Design:
- Tracing a pipelined step used to trace every forward action as a fresh copy of its stage's
  layers: M x K copies, and M x K copies again for the backward. Here each stage's forward is
  one `tf.function` per training flag (and input signature), called once per micro-batch; the
  per-stage tapes differentiate the call through the one gradient function TensorFlow makes
  for it. The small dense weight-gradient sums are one call per stage and micro-batch too
  (`tfpipe.executor.grads`; a large one is one addition in the step's graph). Measured on
  a 12-block Transformer (width 64, sequence 32, K = 4, 1F1B, 2 CPU cores,
  `benchmarks/trace_cost.py`; figures in docs/benchmarks.md): at
  M = 8 the traced step went from 53,467 operations to 1,723 and its trace from 16.4 s to
  3.6 s; at M = 32 from 211,915 to 4,363, and the first step from 185 s to 22 s.
- With replicas, a copy past the first passes its one read of the stage's weights per step
  as an argument (`tfpipe.executor.weights`): one more trace of the same function, and its
  calls read that tensor in place of the variables held on copy 0's devices.
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
  subclassed models trained whole are called directly: neither is a stage function, so
  neither is compiled with XLA; when XLA was asked for, `warn_uncompiled` says so once.
- The model's own inputs (the data) enter a stage function behind `tf.stop_gradient`
  (`without_data_gradients`). Keras's step never differentiates the loss by the data, but
  the gradient TensorFlow makes for a function call computes one for every float input of
  the call, and on the workers nothing pruned it from the calls, which are not inlined: for
  the first Dense(1024) of the benchmarks' MLP, a batch x 1024 x 1024 product per step that
  `model.fit` does not run. Stopped inside, the gradient has none to compute: side by side
  on two one-core workers at batch 2048, the whole-batch step 595.3 against 609.0 ms, 1F1B
  at M = 8 443.9 against 449.5 ms (docs/benchmarks.md).
- XLA (`jit_compile`, resolved by `PipelineOptions.xla`): each stage's function is built
  with `jit_compile=True` and called under its stage's `tf.device`, so each stage compiles
  on its own device (one XLA program cannot span devices, so a whole pipelined step cannot
  be one). TensorFlow marks the gradient function it makes for a jit-compiled call
  `_XlaMustCompile` too, so the stage's backward is compiled as well (`tests/test_jit.py`
  reads both attributes in the traced step). XLA caches one executable per input shape: a
  short last batch compiles once more, not once per step.
- A stage XLA cannot compile (an op without an XLA kernel, such as `tf.numpy_function`, or a
  variable held on another stage's device) would fail the first step with TensorFlow's
  error. So before a stage's function is first built, `xla_refusal` lowers the stage's
  forward and its gradient to HLO for that micro-batch's input shapes on the stage's
  device (`experimental_get_compiler_ir(...)(stage="hlo")`: lowering, not compiling). On
  2 CPU cores that took 50-90 ms per stage of the 8 x Dense(1024) MLP at K = 4 and 170-230
  ms per stage of the demo Transformer (first fit 3.5 s and 16.6 s). If it fails, that stage
  alone runs without XLA and one warning names the stage, its layers and the reason.
- A step Keras compiles whole with XLA (one device, one copy, one micro-batch:
  `PipelineOptions.whole_step_xla`) runs each stage once, so there is nothing to trace once
  and call again: its forwards are traced inline (`inline`), as in Keras's own step. As
  separate functions, the gradient TensorFlow made for each call gave XLA a different graph
  to fuse (one loop fusion of 211 operations over twelve LayerNormalizations' gradients in
  the demo Transformer, where `model.fit`'s largest had 81), and the step ran at 0.97 of
  `model.fit(jit_compile=True)`'s throughput; inline at 1.03 (a probe, side by side, 5 x 30
  steps) and 1.000 (`benchmarks/overhead.py --jit`). Such a step is compiled by Keras, so a
  stage found uncompilable while it is traced could not fall back: the whole step failed with
  TensorFlow's error. So the stages are lowered when the pipeline is built, for their graph
  inputs' shapes (`compile_whole`); if one cannot be, the step is compiled stage by stage.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Collection, Sequence
from typing import Any

import keras
import tensorflow as tf

from tfpipe._keras import compile_key
from tfpipe.executor.batchnorm import DeferredBatchNorm, collecting
from tfpipe.executor.weights import reading
from tfpipe.partition import Stage

Records = list[tuple[int, Any]]
"""`(id(layer), (mean, variance, count))` per BatchNormalization call (deferred mode)."""

_OWN_JIT: weakref.WeakKeyDictionary[keras.Model, tuple[Any, bool]] = weakref.WeakKeyDictionary()
"""A model's own `jit_compile`, kept when `turn_off_jit_compile` set it False."""


def model_jit_compile(model: keras.Model) -> bool:
    """The model's `jit_compile` as Keras resolved it at `compile` (what `jit_compile="auto"`
    follows), also after `turn_off_jit_compile`, until the model is compiled again.

    Keras's `compile(jit_compile="auto")` stores a bool: True when a device other than a CPU
    is visible, no distribution strategy is set and every layer `supports_jit`; an
    uncompiled model's `jit_compile` resolves `"auto"` the same way when read.
    """
    kept = _OWN_JIT.get(model)
    if kept is not None and kept[0] == compile_key(model):
        return kept[1]
    return bool(getattr(model, "jit_compile", False))


def turn_off_jit_compile(model: keras.Model) -> None:
    """Sets `model.jit_compile` to False, keeping its value for `model_jit_compile`."""
    _OWN_JIT[model] = (compile_key(model), model_jit_compile(model))
    model.jit_compile = False


def without_data_gradients(inputs: list[Any], ids: Sequence[Any],
                           data_ids: Collection[int]) -> list[Any]:
    """`inputs`, each float one whose graph tensor is a model input (its id in `data_ids`)
    passed through `tf.stop_gradient`: inside a stage's function, so that the function's
    gradient computes nothing for the data (module docstring).

    Args:
        inputs: a stage's input values, inside its function.
        ids: the ids of the graph tensors they stand for (`inputs` order).
        data_ids: the ids of the model's input tensors.
    """
    return [tf.stop_gradient(x) if i in data_ids and x.dtype.is_floating else x
            for x, i in zip(inputs, ids)]


class StageFunctions:
    """The forward functions of a pipeline's stages.

    Args:
        deferred: the pipeline's deferred BatchNormalization layers, or None.
        jit_compile: compile each stage's function with XLA, on its stage's device (a stage
            that XLA cannot compile runs without, with a warning).
        inline: trace each forward into the caller's graph instead (no `tf.function`): for a
            step Keras compiles whole with XLA, where each stage runs once per step.
        data_ids: the ids of the model's input tensors (`without_data_gradients`).

    Attributes:
        refused: why XLA could not compile a stage, by stage index (with `jit_compile`).
    """

    def __init__(
        self, deferred: DeferredBatchNorm | None, jit_compile: bool = False, inline: bool = False,
        data_ids: Collection[int] = (),
    ) -> None:
        self.deferred = deferred
        self.data_ids = frozenset(data_ids)
        self.jit_compile = jit_compile
        self.inline = inline
        self.refused: dict[int, str] = {}
        self._lowered: set[int] = set()  # training forwards `compile_whole` lowered already
        self._functions: dict[tuple[int, bool], Any] = {}
        self._moment_layers: dict[tuple[int, bool], list[int]] = {}
        self._compiled: dict[tuple[int, bool], bool] = {}

    def __call__(
        self, stage: Stage, inputs: list[Any], training: bool, weights: list[Any] | None = None
    ) -> tuple[list[Any], list[Any], Records]:
        """Runs `stage`'s forward on one micro-batch's `inputs` (on the caller's device).

        Args:
            stage: the stage.
            inputs: the micro-batch's stage inputs.
            training: Keras's training flag.
            weights: a replica's read of the stage's trainable variables
                (`tfpipe.executor.weights`), which the call then reads in their place; None
                reads the variables.

        Returns:
            The stage's outputs (flat, in `stage.outputs` order), its `add_loss` terms, and
            its BatchNormalization moments (empty unless deferred).
        """
        key = (stage.index, training)
        if key not in self._functions:
            self._functions[key] = self._build(stage, training, key, inputs)
        outs, losses, moments = self._functions[key](inputs, weights)
        layers = self._moment_layers[key]
        records = [(layer, tuple(moments[3 * j : 3 * j + 3])) for j, layer in enumerate(layers)]
        return list(outs), list(losses), records

    def tracing_counts(self) -> dict[tuple[int, bool], int]:
        """How many times each `(stage index, training)` function was traced (not inline)."""
        if self.inline:  # plain Python functions, traced with the step
            return {}
        return {k: f.experimental_get_tracing_count() for k, f in self._functions.items()}

    def compiled(self) -> dict[tuple[int, bool], bool]:
        """Whether each `(stage index, training)` function was built with `jit_compile=True`."""
        return dict(self._compiled)

    def compile_whole(self, stages: Sequence[Stage]) -> None:
        """Before a step Keras compiles whole with XLA (`inline`): lowers each stage's forward
        and gradient (`xla_refusal`, for its graph inputs' shapes). When one cannot be
        lowered, the stages become functions again (`inline` False), compiled one by one with
        that stage (`refused`) running without XLA, and one warning says so (a refusal found
        while Keras traced its XLA step could not be acted on: the step would fail to compile).

        Args:
            stages: the pipeline's stages (a subclassed model trained whole is not probed).
        """
        for stage in stages:
            if stage.inputs is None:
                continue
            key = (stage.index, True)
            reason = xla_refusal(stage, True, self._forward(stage, True, key), stage.inputs)
            if reason is None:
                self._lowered.add(stage.index)
            else:
                self.refused[stage.index] = reason
                self.inline = False
                warnings.warn(
                    f"tfpipe jit_compile: XLA cannot compile stage {stage.index} "
                    f"({', '.join(stage.names)}) on {stage.device}: {reason}. The step is not "
                    "compiled whole; that stage runs without XLA and the other stages are "
                    "compiled one by one (jit_compile=False turns XLA off for all).",
                    stacklevel=3,
                )
                return

    def xla_for(self, stage: Stage, training: bool, forward: Callable[..., Any],
                inputs: Sequence[Any], probed: bool = False) -> bool:
        """Whether to compile `stage`'s function with XLA: when `jit_compile` is on and XLA
        can lower `forward` (`xla_refusal`, unless `probed` already); else False, and the
        first refusal of a stage is kept in `refused` and warned about once."""
        if not self.jit_compile or stage.index in self.refused:
            return False
        reason = None if probed else xla_refusal(stage, training, forward, inputs)
        if reason is not None:
            self.refused[stage.index] = reason
            warnings.warn(
                f"tfpipe jit_compile: XLA cannot compile stage {stage.index} "
                f"({', '.join(stage.names)}) on {stage.device}: {reason}. That stage runs "
                "without XLA; the other stages stay compiled (jit_compile=False turns XLA "
                "off for all).",
                stacklevel=3,
            )
        return reason is None

    def _forward(self, stage: Stage, training: bool, key: tuple[int, bool]) -> Callable[
            ..., tuple[list[Any], list[Any], list[Any]]]:
        ids = [id(t) for t in stage.inputs or []]

        def forward(
            inputs: list[Any], weights: list[Any] | None = None
        ) -> tuple[list[Any], list[Any], list[Any]]:
            inputs = without_data_gradients(inputs, ids, self.data_ids)
            with reading(stage.model, stage.trainable_variables, weights):
                with collecting(self.deferred) as got:
                    outs = keras.tree.flatten(stage.model(inputs, training=training))
                losses = list(stage.model.losses)
            self._moment_layers[key] = [layer for layer, _ in got]
            return outs, losses, [t for _, ms in got for t in ms]

        return forward

    def _build(
        self, stage: Stage, training: bool, key: tuple[int, bool], inputs: list[Any]
    ) -> Any:
        forward = self._forward(stage, training, key)
        # inline, a stage is part of Keras's XLA step: nothing to fall back to, nothing to probe
        lowered = self.inline or (training and stage.index in self._lowered)
        jit = self.xla_for(stage, training, forward, inputs, probed=lowered)
        self._compiled[key] = jit
        if self.inline:
            return forward
        return tf.function(forward, autograph=False, reduce_retracing=True,
                           jit_compile=True if jit else None,
                           experimental_attributes={"_noinline": True})


def xla_refusal(
    stage: Stage,
    training: bool,
    forward: Callable[..., tuple[list[Any], list[Any], list[Any]]],
    inputs: Sequence[Any],
) -> str | None:
    """Why XLA cannot compile a stage's forward (and, in training, its gradient), or None.

    Lowers a separate `jit_compile=True` function over `forward` to HLO, eagerly (outside
    the step being traced) on the stage's device, for `inputs`' dtypes and shapes (an
    unknown dimension taken as 2: which ops XLA supports does not depend on sizes). The
    stage's own function is not traced by this, so its tracing count is unchanged.

    Args:
        stage: the stage (its device and trainable variables).
        training: whether to lower the gradient for the stage's inputs and weights too.
        forward: the stage's forward, as its function runs it.
        inputs: one micro-batch's inputs (symbolic tensors of the step being traced).

    Returns:
        None when lowering succeeds, else the first line of TensorFlow's error.
    """
    specs = [tf.TensorSpec([2 if d is None else d for d in x.shape], x.dtype) for x in inputs]

    def lowered(*xs: Any) -> Any:
        floats = [x for x in xs if x.dtype.is_floating]
        with tf.GradientTape() as tape:
            tape.watch(floats)
            outs, losses, _ = forward(list(xs))
        if not training:
            return outs
        targets = [tf.reduce_sum(tf.cast(t, tf.float32))
                   for t in outs + losses if t.dtype.is_floating]
        grads = tape.gradient(targets, floats + stage.trainable_variables)
        return outs, [g for g in grads if g is not None]

    probe = tf.function(lowered, autograph=False, jit_compile=True)
    try:
        with tf.init_scope(), tf.device(stage.device):
            probe.experimental_get_compiler_ir(*specs)(stage="hlo")
    except Exception as err:  # noqa: BLE001 (any failure to lower means: do not compile)
        text = str(err).removeprefix("Failed getting HLO text: ").strip("'\" ")
        return (text.splitlines() or [type(err).__name__])[0][:400]
    return None


def warn_uncompiled(stages: Sequence[Stage], why: str) -> None:
    """Warns, once per pipeline, that `stages` run without the XLA that was asked for.

    Args:
        stages: the stages that are not stage functions.
        why: why they are not, as a sentence.
    """
    names = "; ".join(f"stage {st.index} ({', '.join(st.names)})" for st in stages)
    warnings.warn(
        f"tfpipe jit_compile: {names} run(s) without XLA: {why}", stacklevel=3
    )
