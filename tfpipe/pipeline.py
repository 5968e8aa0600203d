"""`Pipeline`: a Keras model split into device-placed stages, trained through Keras's own `fit`.

Design: `Pipeline` owns the split (stages), the schedule and the executor, and nothing of the
training loop. `fit` / `evaluate` / `predict` lend the executor's steps to the user's model
through Keras's documented seam (`train_step`, `test_step`, `predict_step`) for the length of
the call and then call the model's own method, so data adapters, callbacks, the progress bar,
History and validation are Keras's. Everything that can be wrong with the arguments is checked
before any variable moves, so a refused pipeline leaves the user's model as it was.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf

from tfpipe import report, schedules
from tfpipe._keras import lend_methods, wrap_train_function
from tfpipe.atomic import atomic_saves
from tfpipe.balance import (
    LayerCost,
    activation_bytes_per_sample,
    imbalance,
    profile_layers,
    solve,
)
from tfpipe.cut_traffic import summary_lines
from tfpipe.data import host_prefetched
from tfpipe.devices import default_devices, resolve_devices
from tfpipe.errors import PipelineError, runtime_message
from tfpipe.executor import Executor
from tfpipe.executor.inputs import check_array_inputs
from tfpipe.executor.stagefn import model_jit_compile, turn_off_jit_compile
from tfpipe.oom import memory_errors
from tfpipe.options import PipelineOptions
from tfpipe.partition import Stage, check_gradient_paths, read_graph, split
from tfpipe.placement import place_model, updates_on_variable_devices
from tfpipe.traffic import LOOPS_UNROLLED, StepTraffic, step_traffic

_STEPS = ("train_step", "test_step", "predict_step")
_FUNCTIONS = ("train_function", "test_function", "predict_function")


class Pipeline:
    """A compiled Keras model split into stages, each on its own device.

    Args:
        model: a built Keras model (compiled, to train or evaluate): Sequential, Functional
            (nested models read through) or subclassed (its `call` traced on `sample`). Its
            layers and variables are shared, not copied: training it trains `model`.
        stages: number of stages K, balanced by parameter count. Defaults to one per
            available device (the visible GPUs, else the logical CPU devices).
        balance: how to balance the `stages`: `"params"` (default: parameter counts),
            `"time"` (profiled forward+backward time per layer on `sample`), `"memory"`
            (profiled activation + parameter + optimizer bytes), or layer calls per stage
            `[n1, ..., nK]` instead of `stages`.
        devices: device names, one per stage; fewer than K puts contiguous stages on each
            device. Defaults to the visible GPUs, else the logical CPU devices.
        micro_batches: M, the number of slices each batch is cut into.
        schedule: `"gpipe"`, `"1f1b"`, `"interleaved"`, `"zb-h1"`, `"looped-bfs"`, `"zb-v"`,
            `"interleaved-zb"`, `"dualpipe-v"` or a `Schedule` (ranks: devices, stages: pieces).
        chunks: for `"interleaved"`, `"looped-bfs"`, `"interleaved-zb"`, pieces per device, v
            (default 2; `"zb-v"`, `"dualpipe-v"`: 2): K*v stages, device r holds r, r+K, ...
        profile: record when each action of a training step started and ended;
            `timeline()` returns the latest step's measured timeline. Each device then runs
            its actions one after another in the schedule's order (so that a start is when
            the action's work starts); devices still run at the same time.
        split_points: layer names where a new stage starts, instead of `stages`/`balance`,
            for example `["block_3", "block_7"]` for three stages; inside a nested model, by
            path (`"llama_backbone/transformer_layer_2"`) or by an unambiguous plain name.
        sample: a batch of inputs, for `balance="time"` / `"memory"` and to trace a
            subclassed model (`tfpipe.fit` passes the first batch of its data).
        recompute: activation recomputation: `"never"`, `"except_last"` (every stage but the
            last), `"always"`, or one entry per stage (`True`/`False` or those names). A
            recomputed stage keeps only its inputs per in-flight micro-batch and runs its
            forward again during its backward.
        check_numerics: stop at the first NaN or Inf with an error naming the stage, the
            layer and whether it was the forward or the backward (slower: for debugging).
        replicas: R, data-parallel copies of the pipeline (default 1). `devices` then lists
            R*K devices, copy r using devices `r*K .. r*K+K-1`; each batch is split into R*M
            micro-batches, copy r taking the r-th run of M; each copy reads its weights once a
            step, and each stage's gradients are summed onto copy 0's device (sent and added
            with two copies, packed collectives with more) before the one optimizer step.
            The variables stay one set, on copy 0's devices.
        batch_norm: `"micro-batch"` (default: BatchNormalization updates its moving statistics
            per micro-batch, as Keras would on each) or `"deferred"` (once per batch, from all
            its micro-batches, as one full-batch step would; see `tfpipe.executor.batchnorm`).
        jit_compile: XLA on each stage's forward and backward, compiled on the stage's
            device: `"auto"` (default: when the model's own `jit_compile` is True, as Keras's
            `"auto"` makes it on a GPU machine), `True` or `False`. A stage XLA cannot compile
            runs without, with a warning (see `tfpipe.executor.stagefn`).
        rank_loops: `"auto"` (default): the steady phase as one in-graph loop over all
            devices (a graph that grows with K, not M x K) where it runs every feature asked
            for, XLA off, stages in one process, else unrolled; `"steady"`: that loop or an
            error naming what it does not run; `True`: one loop per device; `False`: unrolled.

    Attributes:
        stages: the `Stage`s: `.model` (Keras sub-model), `.device`, `.num_params`, `.layers`;
            K*v of them for interleaved schedules.
        schedule: the validated `Schedule`.
        options: the checked `tfpipe.options.PipelineOptions` it was built with
            (`Pipeline.from_options(model, options)` builds one from such an object).
        jit_compile: whether the stage functions are compiled with XLA (`"auto"` resolved).

    Raises:
        PipelineError: for wrong stage counts, missing devices, or a split the model cannot
            take; nothing is moved in that case. `fit` and `evaluate` need a compiled model.

    Example:
        >>> pipe = tfpipe.Pipeline(model, stages=4, micro_batches=8)
        >>> pipe.summary()
        >>> pipe.fit(dataset, epochs=3)
    """

    def __init__(
        self,
        model: keras.Model,
        stages: int | None = None,
        balance: str | Sequence[int] | None = None,
        devices: Sequence[str] | None = None,
        micro_batches: int = 1,
        schedule: str | schedules.Schedule = "gpipe",
        chunks: int | None = None,
        profile: bool = False,
        split_points: Sequence[str] | None = None,
        sample: Any = None,
        recompute: str | Sequence[str | bool] = "never",
        check_numerics: bool = False,
        replicas: int = 1,
        batch_norm: str = "micro-batch",
        jit_compile: bool | str = "auto",
        rank_loops: bool | str = "auto",
    ) -> None:
        _check_model(model)
        options = PipelineOptions(
            stages=stages, balance=balance, devices=devices, micro_batches=micro_batches,
            schedule=schedule, chunks=chunks, profile=profile, split_points=split_points,
            recompute=recompute, check_numerics=check_numerics, replicas=replicas,
            batch_norm=batch_norm, jit_compile=jit_compile, rank_loops=rank_loops,
        )
        self._build(model, options, sample)

    @classmethod
    def from_options(
        cls, model: keras.Model, options: PipelineOptions, sample: Any = None
    ) -> Pipeline:
        """The pipeline of `model` for already checked options.

        Args:
            model: as for `Pipeline`.
            options: a `tfpipe.options.PipelineOptions`, for example
                `tfpipe.plan(...).best.options()`.
            sample: a batch of inputs, for `balance="time"` / `"memory"`.

        Returns:
            The `Pipeline`, exactly as `Pipeline(model, sample=sample, **options.kwargs())`.

        Raises:
            PipelineError: as `Pipeline`.

        Example:
            >>> pipe = tfpipe.Pipeline.from_options(model, plan.best.options(), sample=x[:64])
        """
        _check_model(model)
        pipe = cls.__new__(cls)
        pipe._build(model, options, sample)
        return pipe

    def _build(self, model: keras.Model, options: PipelineOptions, sample: Any) -> None:
        """Lays out, splits and places `model`; every check runs before any variable moves."""
        mode = options.balance_mode
        if mode in ("time", "memory") and sample is None:
            raise PipelineError(
                f"balance={mode!r} profiles each layer on a sample batch: pass sample=<a batch "
                "of inputs> (tfpipe.fit does this from its data), or use balance='params'."
            )
        self.model, self.options, self.replicas = model, options, options.replicas
        self.schedule, self.replica_devices = _lay_out(options)
        stage_devices = self.replica_devices[0]
        self.layer_costs: list[LayerCost] | None = None
        with memory_errors() as scope:  # profiling, or weights made on a device too small
            if mode in ("time", "memory"):
                self.layer_costs = profile_layers(model, sample, device=stage_devices[0])
            self.balanced_by = options.balanced_by
            self.stages: list[Stage] = _split(model, options, stage_devices,
                                              self.layer_costs, sample)
            scope.stages = self.stages
            self.recompute = _recompute_flags(options, self.stages)
            self.jit_compile = options.xla(model_jit_compile(model))
            self.executor = Executor(
                model, self.stages, self.schedule, profile=options.profile,
                recompute=self.recompute, check_numerics=options.check_numerics,
                replica_devices=self.replica_devices, batch_norm=options.batch_norm,
                jit_compile=self.jit_compile, rank_loops=options.rank_loops,
                whole_step_xla=options.whole_step_xla(self.jit_compile, len(set(stage_devices))))
            self.whole_step_xla = self.executor.whole_step_xla
            _place(model, self.stages)
        self._functions: dict[str, Any] = dict.fromkeys(_FUNCTIONS)
        self._traffic: StepTraffic | None = None  # the latest traffic() step

    def timeline(self) -> list[tuple[int, schedules.Action, float, float]]:
        """Measured `(rank, action, start_ms, end_ms)` of the latest step (needs `profile=True`)."""
        return self.executor.timeline()

    @property
    def micro_batches(self) -> int:
        """M, the number of micro-batches per step."""
        return self.schedule.num_micro_batches

    # Keras entry points ---------------------------------------------------------------------

    def fit(self, x: Any = None, y: Any = None, **kwargs: Any) -> keras.callbacks.History:
        """Trains the model pipelined; arguments and result as `keras.Model.fit` (a
        `PipelineError` when the model is not compiled)."""
        history: keras.callbacks.History = self._keras_call("fit", x, y, **kwargs)
        return history

    def evaluate(self, x: Any = None, y: Any = None, **kwargs: Any) -> Any:
        """Evaluates pipelined (forward only); same arguments as `keras.Model.evaluate`."""
        return self._keras_call("evaluate", x, y, **kwargs)

    def predict(self, x: Any, **kwargs: Any) -> Any:
        """Predicts pipelined; same arguments as `keras.Model.predict`."""
        return self._keras_call("predict", x, **kwargs)

    def _keras_call(self, method: str, x: Any, *args: Any, **kwargs: Any) -> Any:
        """The model's own `method`, with the executor's steps lent, on `x` (and
        `validation_data`) prefetched on the host when a dataset (`tfpipe.data.host_prefetched`)."""
        if method != "predict" and not _compiled(self.model):
            raise PipelineError(
                f"Model {self.model.name!r} is not compiled: call model.compile(optimizer=..., "
                f"loss=..., metrics=...) before {method} (predict needs no compile)."
            )
        check_array_inputs(self.model, x)
        kwargs = {k: host_prefetched(v) if k == "validation_data" else v for k, v in kwargs.items()}
        with self._attached():
            return getattr(self.model, method)(host_prefetched(x), *args, **kwargs)

    @contextlib.contextmanager
    def _attached(self) -> Iterator[None]:
        """Lends the executor's steps and traced functions to the model, with updates on each
        variable's device, atomic saves and the step's glue options, for one Keras call."""
        model = self.model
        saved = {name: getattr(model, name) for name in _FUNCTIONS}
        jit = model.jit_compile
        for name in _FUNCTIONS:
            setattr(model, name, self._functions[name])
        model.jit_compile = self.whole_step_xla  # one XLA program cannot span devices
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(
                    lend_methods(model, {name: getattr(self.executor, name) for name in _STEPS})
                )
                wrap_train_function(model, self.executor.glue_options)  # the step: glue only
                stack.enter_context(atomic_saves(model))
                stack.enter_context(memory_errors(self.stages))
                if getattr(model, "optimizer", None) is not None:
                    stack.enter_context(updates_on_variable_devices(model.optimizer))
                yield
        except tf.errors.InvalidArgumentError as err:  # a check that fired inside the step
            message = runtime_message(str(err))
            if message is None:
                raise
            raise PipelineError(message) from err
        finally:
            for name in _FUNCTIONS:
                self._functions[name] = getattr(model, name)
                setattr(model, name, saved[name])
            model.jit_compile = jit

    # reporting ------------------------------------------------------------------------------

    def summary(self, print_fn: Callable[[str], None] = print) -> str:
        """Prints (and returns) the stage table and the least traffic between devices.

        Per stage: its layers, parameters, estimated activation bytes per sample (outputs of
        its layer calls), profiled forward+backward time when balanced by time or memory,
        and its device; then the imbalance (largest stage / mean) of the balanced cost. Then
        the least bytes between each pair of devices (`tfpipe.cut_traffic`): per sample, or
        once `traffic(x, y)` ran, for its batch beside all that step sent.
        """
        costs = self.layer_costs
        text = "\n".join([
            report.pipeline_title(self.model.name, len(self.stages), self.micro_batches,
                                  self.schedule.name, self.balanced_by, self.replica_devices),
            *report.stage_table(
                self.stages,
                report.per_layer(
                    self.stages, lambda: activation_bytes_per_sample(read_graph(self.model))
                ),
                None if costs is None else [c.seconds for c in costs],
                imbalance,
            ),
            *summary_lines(self.model, self.stages, self.replica_devices, self.micro_batches,
                           self._traffic),
        ])
        print_fn(text)
        return text

    def traffic(self, x: Any, y: Any, print_fn: Callable[[str], None] = print) -> str:
        """Prints (and returns) the bytes one training step on `(x, y)` sends between each pair
        of devices, by kind, as TensorFlow placed it (`tfpipe.traffic.step_traffic`: run once,
        then its changes set back; a step run as loops: its unrolled step, said so)."""
        step = self.executor if self.executor.loops is None else Executor(
            self.model, self.stages, self.schedule, rank_loops=False)
        with self._attached():
            self._traffic = step_traffic(step.train_step, self.model, x, y)
        text = self._traffic.table() + ("" if step is self.executor else "\n" + LOOPS_UNROLLED)
        print_fn(text)
        return text

    def __repr__(self) -> str:
        return (f"Pipeline({self.model.name!r}, stages={len(self.stages)}, "
                f"micro_batches={self.micro_batches}, schedule={self.schedule.name!r}, "
                f"devices={[s.device for s in self.stages]})")


def _compiled(model: keras.Model) -> bool:
    return bool(getattr(model, "compiled", False)) and getattr(model, "optimizer", None) is not None


def _check_model(model: Any) -> None:
    if not isinstance(model, keras.Model):
        raise PipelineError(f"tfpipe needs a keras.Model, got {type(model).__name__}.")
    if not model.built:
        raise PipelineError(
            f"Model {model.name!r} is not built: start it with keras.Input(shape=...), call "
            "model.build(input_shape), or use tfpipe.fit, which builds it from the data."
        )


def _lay_out(options: PipelineOptions) -> tuple[schedules.Schedule, list[list[str]]]:
    """The validated schedule, and each copy's device per model piece (`replica_devices`)."""
    num_stages = options.count_stages(default_devices)
    schedule = schedules.get(
        options.schedule, num_stages, options.micro_batches, chunks=options.num_chunks
    )
    ranks, replicas, devices = schedule.num_ranks, options.replicas, options.devices
    if replicas > 1 and devices is not None and len(devices) != ranks * replicas:
        raise PipelineError(
            f"replicas={replicas} copies of a {ranks}-device pipeline need "
            f"{ranks * replicas} devices, one per stage per copy, but devices lists "
            f"{len(devices)}: {list(devices)}. Give {ranks * replicas} devices (copy r uses "
            f"devices[{ranks}*r : {ranks}*r+{ranks}]), or change stages / replicas."
        )
    given = list(devices) if isinstance(devices, tuple) else devices
    all_devices = resolve_devices(given, ranks * replicas)
    return schedule, [[all_devices[r * ranks + schedule.rank_of(k)] for k in range(num_stages)]
                      for r in range(replicas)]


def _split(model: keras.Model, options: PipelineOptions, devices: Sequence[str],
           layer_costs: Sequence[LayerCost] | None, sample: Any) -> list[Stage]:
    """The stages on `devices` (one per model piece), refusing cuts no gradient crosses."""
    costs = None
    if layer_costs is not None:
        by_time = options.balance_mode == "time"
        costs = [c.seconds if by_time else c.memory_bytes for c in layer_costs]
    stages = split(model, len(devices), options.layer_counts, devices,
                   split_points=options.split_points, costs=costs, solver=solve, sample=sample)
    if _compiled(model):
        check_gradient_paths(stages)
    return stages


def _recompute_flags(options: PipelineOptions, stages: Sequence[Stage]) -> list[bool]:
    """One recompute flag per stage; a stage listed for it must have weights of its own."""
    flags = options.recompute_flags(len(stages))
    for st, flag in zip(stages, flags):
        if flag and not st.trainable_variables and not isinstance(options.recompute, str):
            names = ", ".join(st.names)
            raise PipelineError(
                f"recompute asks stage {st.index} ({names}) to recompute, but it has no "
                "trainable weights: its backward needs no saved "
                f"activations of its own. Set entry {st.index} to False."
            )
    return flags


def _place(model: keras.Model, stages: Sequence[Stage]) -> None:
    """Moves each stage's variables (and optimizer slots) to its device; drops functions
    traced before the move; turns off `jit_compile` when the stages span devices."""
    place_model(model, stages, model.optimizer if _compiled(model) else None)
    for name in _FUNCTIONS:  # functions traced before the move captured the old storage
        setattr(model, name, None)
    num_devices = len({st.device for st in stages})
    if model.jit_compile and num_devices > 1:
        warnings.warn(
            f"Model {model.name!r} was compiled with jit_compile=True, but tfpipe placed its "
            f"variables on {num_devices} devices and one XLA program cannot span them: "
            "model.jit_compile is now False, so plain model.fit / predict keep working on the "
            "placed model (tfpipe compiles each stage on its own device: see jit_compile).",
            stacklevel=4,  # _place < _build < Pipeline() / from_options < the caller
        )
        turn_off_jit_compile(model)

