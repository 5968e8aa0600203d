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

from tfpipe import schedules
from tfpipe.atomic import atomic_saves
from tfpipe.balance import LayerCost, activation_bytes_per_sample, imbalance, profile_layers
from tfpipe.devices import default_devices, resolve_devices
from tfpipe.errors import PipelineError, runtime_message
from tfpipe.executor import Executor
from tfpipe.executor.inputs import check_array_inputs
from tfpipe.executor.microbatch import check_micro_batches
from tfpipe.partition import Stage, check_gradient_paths, read_graph, split
from tfpipe.placement import (
    place_optimizer,
    place_stages,
    storage_keys,
    updates_on_variable_devices,
)

_STEPS = ("train_step", "test_step", "predict_step")
_FUNCTIONS = ("train_function", "test_function", "predict_function")


class Pipeline:
    """A compiled Keras model split into stages, each on its own device.

    Args:
        model: a built Sequential or Functional Keras model (compiled, to train or
            evaluate). Its layers and variables are shared, not copied: training the
            pipeline trains `model`.
        stages: number of stages K, balanced by parameter count. Defaults to one per
            available device (the visible GPUs, else the logical CPU devices).
        balance: how to balance the `stages`: `"params"` (default: parameter counts),
            `"time"` (profiled forward+backward time per layer on `sample`), `"memory"`
            (profiled activation + parameter + optimizer bytes), or layer calls per stage
            `[n1, ..., nK]` instead of `stages`.
        devices: device names, one per stage; fewer than K puts contiguous stages on each
            device. Defaults to the visible GPUs, else the logical CPU devices.
        micro_batches: M, the number of slices each batch is cut into.
        schedule: `"gpipe"`, `"1f1b"`, `"interleaved"`, `"zb-h1"`, or a
            `tfpipe.schedules.Schedule` (its ranks are the devices, its stages the model pieces).
        chunks: for `"interleaved"`, model pieces per device, v (default 2): the model is cut
            into K*v stages and device r holds stages r, r+K, r+2K, ...
        profile: record when each action of a training step started and ended;
            `timeline()` returns the latest step's measured timeline. Each device then runs
            its actions one after another in the schedule's order (so that a start is when
            the action's work starts); devices still run at the same time.
        split_points: layer names where a new stage starts, instead of `stages`/`balance`,
            for example `["block_3", "block_7"]` for three stages.
        sample: a batch of inputs for `balance="time"` / `"memory"` (`tfpipe.fit` passes the
            first batch of its data).
        recompute: activation recomputation: `"never"`, `"except_last"` (every stage but the
            last), `"always"`, or one entry per stage (`True`/`False` or those names). A
            recomputed stage keeps only its inputs per in-flight micro-batch and runs its
            forward again during its backward.
        check_numerics: stop at the first NaN or Inf with an error naming the stage, the
            layer and whether it was the forward or the backward (slower: for debugging).
        replicas: R, data-parallel copies of the pipeline (default 1). `devices` then lists
            R*K devices, copy r using devices `r*K .. r*K+K-1`; each batch is split into R*M
            micro-batches, copy r taking the r-th run of M, and each stage's gradients are
            all-reduced over its R devices with TensorFlow collective ops before the one
            optimizer step. The variables stay one set, on copy 0's devices.

    Attributes:
        stages: the `Stage`s: `.model` (Keras sub-model), `.device`, `.num_params`, `.layers`;
            K*v of them for interleaved schedules.
        schedule: the validated `Schedule`.

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
    ) -> None:
        if not isinstance(model, keras.Model):
            raise PipelineError(f"tfpipe needs a keras.Model, got {type(model).__name__}.")
        if not model.built:
            raise PipelineError(
                f"Model {model.name!r} is not built: start it with keras.Input(shape=...), call "
                "model.build(input_shape), or use tfpipe.fit, which builds it from the data."
            )
        micro_batches = check_micro_batches(micro_batches)
        replicas = _check_replicas(replicas)
        chunks = _check_chunks(schedule, chunks)
        mode = balance if isinstance(balance, str) else None
        counts = None if isinstance(balance, str) else balance
        if mode not in (None, "params", "time", "memory"):
            raise PipelineError(
                f"balance={balance!r}: use 'params', 'time', 'memory' or a list of layer counts."
            )
        if mode in ("time", "memory") and sample is None:
            raise PipelineError(
                f"balance={mode!r} profiles each layer on a sample batch: pass sample=<a batch "
                "of inputs> (tfpipe.fit does this from its data), or use balance='params'."
            )
        if split_points is not None:
            if counts is not None:
                raise PipelineError("Give balance=[...] or split_points=[...], not both.")
            counts_or_points: Sequence[Any] | None = [None] * (len(list(split_points)) + 1)
        else:
            counts_or_points = counts
        num_stages = _count_stages(schedule, stages, counts_or_points, devices, chunks, replicas)
        self.model = model
        self.schedule = schedules.get(schedule, num_stages, micro_batches, chunks=chunks)
        self.replicas = replicas
        ranks = self.schedule.num_ranks
        if replicas > 1 and devices is not None and len(devices) != ranks * replicas:
            raise PipelineError(
                f"replicas={replicas} copies of a {ranks}-device pipeline need "
                f"{ranks * replicas} devices, one per stage per copy, but devices lists "
                f"{len(devices)}: {list(devices)}. Give {ranks * replicas} devices (copy r uses "
                f"devices[{ranks}*r : {ranks}*r+{ranks}]), or change stages / replicas."
            )
        all_devices = resolve_devices(devices, ranks * replicas)
        self.replica_devices = [
            [all_devices[r * ranks + self.schedule.rank_of(k)] for k in range(num_stages)]
            for r in range(replicas)
        ]
        stage_devices = self.replica_devices[0]
        self.layer_costs: list[LayerCost] | None = None
        if mode in ("time", "memory"):
            self.layer_costs = profile_layers(model, sample, device=stage_devices[0])
        self.balanced_by = mode or (
            "layer counts" if counts is not None or split_points else "params"
        )
        costs = None
        if self.layer_costs is not None:
            costs = [c.seconds if mode == "time" else c.memory_bytes for c in self.layer_costs]
        self.stages: list[Stage] = split(
            model, num_stages, counts, stage_devices, split_points=split_points, costs=costs
        )
        if _compiled(model):
            check_gradient_paths(self.stages)
        self.recompute = _recompute_flags(recompute, len(self.stages))
        for st, flag in zip(self.stages, self.recompute):
            if flag and not st.trainable_variables and not isinstance(recompute, str):
                names = ", ".join(layer.name for layer in st.layers)
                raise PipelineError(
                    f"recompute asks stage {st.index} ({names}) to "
                    "recompute, but it has no trainable weights: its backward needs no saved "
                    f"activations of its own. Set entry {st.index} to False."
                )
        self.executor = Executor(
            model,
            self.stages,
            self.schedule,
            profile=profile,
            recompute=self.recompute,
            check_numerics=check_numerics,
            replica_devices=self.replica_devices,
        )
        variables = list(model.trainable_variables)
        optimizer = model.optimizer if _compiled(model) else None
        keys = storage_keys(optimizer, variables) if optimizer is not None else None
        place_stages(self.stages)
        if optimizer is not None:
            place_optimizer(optimizer, variables, keys)
        for name in _FUNCTIONS:  # functions traced before the move captured the old storage
            setattr(model, name, None)
        if model.jit_compile and len({st.device for st in self.stages}) > 1:
            warnings.warn(
                f"Model {model.name!r} was compiled with jit_compile=True, but tfpipe placed its "
                f"variables on {len({st.device for st in self.stages})} devices and one XLA "
                "program cannot span them: model.jit_compile is now False, so plain "
                "model.fit / predict keep working on the placed model.",
                stacklevel=2,
            )
            model.jit_compile = False
        self._functions: dict[str, Any] = dict.fromkeys(_FUNCTIONS)

    def timeline(self) -> list[tuple[int, schedules.Action, float, float]]:
        """Measured `(rank, action, start_ms, end_ms)` of the latest step (needs `profile=True`)."""
        return self.executor.timeline()

    @property
    def micro_batches(self) -> int:
        """M, the number of micro-batches per step."""
        return self.schedule.num_micro_batches

    # Keras entry points ---------------------------------------------------------------------

    def fit(self, x: Any = None, y: Any = None, **kwargs: Any) -> keras.callbacks.History:
        """Trains the model pipelined; same arguments and return value as `keras.Model.fit`.

        Raises:
            PipelineError: when the model is not compiled.
        """
        self._require_compiled("fit")
        check_array_inputs(self.model, x)
        with self._attached():
            return self.model.fit(x, y, **kwargs)

    def evaluate(self, x: Any = None, y: Any = None, **kwargs: Any) -> Any:
        """Evaluates pipelined (forward only); same arguments as `keras.Model.evaluate`."""
        self._require_compiled("evaluate")
        check_array_inputs(self.model, x)
        with self._attached():
            return self.model.evaluate(x, y, **kwargs)

    def predict(self, x: Any, **kwargs: Any) -> Any:
        """Predicts pipelined; same arguments as `keras.Model.predict`."""
        check_array_inputs(self.model, x)
        with self._attached():
            return self.model.predict(x, **kwargs)

    def _require_compiled(self, what: str) -> None:
        if not _compiled(self.model):
            raise PipelineError(
                f"Model {self.model.name!r} is not compiled: call model.compile(optimizer=..., "
                f"loss=..., metrics=...) before {what} (predict needs no compile)."
            )

    @contextlib.contextmanager
    def _attached(self) -> Iterator[None]:
        """Lends the executor's steps (and this pipeline's traced functions) to the model, with
        optimizer updates on each variable's device and atomic saves, for one Keras call."""
        model = self.model
        saved = {name: getattr(model, name) for name in _FUNCTIONS}
        jit = model.jit_compile
        for name in _STEPS:
            model.__dict__[name] = getattr(self.executor, name)
        for name in _FUNCTIONS:
            setattr(model, name, self._functions[name])
        model.jit_compile = False  # one XLA cluster cannot span several devices
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(atomic_saves(model))
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
            for name in _STEPS:
                model.__dict__.pop(name, None)
            model.jit_compile = jit

    # reporting ------------------------------------------------------------------------------

    def summary(self, print_fn: Callable[[str], None] = print) -> str:
        """Prints (and returns) the stage table.

        Per stage: its layers, parameters, estimated activation bytes per sample (outputs of
        its layer calls), profiled forward+backward time when balanced by time or memory,
        and its device; then the imbalance (largest stage / mean) of the balanced cost.
        """
        per_layer_act = self._per_layer(lambda: activation_bytes_per_sample(read_graph(self.model)))
        per_layer_time = (
            None if self.layer_costs is None else [c.seconds * 1e3 for c in self.layer_costs]
        )
        header = ["stage", "layers", "params", "act/sample"]
        if per_layer_time is not None:
            header.append("time ms")
        header.append("device")
        rows, start = [header], 0
        for st in self.stages:
            names = [layer.name for layer in st.layers]
            span = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
            n = len(names)
            row = [str(st.index), f"{span} ({n})", f"{st.num_params:,}"]
            row.append(_bytes(sum(per_layer_act[start : start + n])) if per_layer_act else "-")
            if per_layer_time is not None:
                row.append(f"{sum(per_layer_time[start : start + n]):.2f}")
            row.append(st.device)
            rows.append(row)
            start += n
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        numeric = {2, 3, 4} if per_layer_time is not None else {2, 3}
        lines = [
            f"Pipeline of {self.model.name!r}: {len(self.stages)} stages x "
            f"{self.micro_batches} micro-batches, schedule {self.schedule.name!r}, "
            f"balanced by {self.balanced_by}"
            + (
                f", {self.replicas} replicas on "
                + "; ".join(", ".join(row) for row in self.replica_devices[1:])
                if self.replicas > 1
                else ""
            )
        ]
        for n, row in enumerate(rows):
            lines.append(
                "  ".join(
                    c.rjust(w) if i in numeric else c.ljust(w)
                    for i, (c, w) in enumerate(zip(row, widths))
                ).rstrip()
            )
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        cost = (
            [float(r[4]) for r in rows[1:]]
            if per_layer_time is not None
            else [float(st.num_params) for st in self.stages]
        )
        lines.append(
            f"Total params: {sum(st.num_params for st in self.stages):,}; imbalance "
            f"(largest / mean {'time' if per_layer_time else 'params'}): {imbalance(cost):.2f}"
        )
        text = "\n".join(lines)
        print_fn(text)
        return text

    def _per_layer(self, fn: Callable[[], list[float]]) -> list[float] | None:
        """Per-layer-call figures, or None for an opaque model trained as one stage."""
        return None if self.stages[0].inputs is None else fn()

    def __repr__(self) -> str:
        return (
            f"Pipeline({self.model.name!r}, stages={len(self.stages)}, "
            f"micro_batches={self.micro_batches}, schedule={self.schedule.name!r}, "
            f"devices={[s.device for s in self.stages]})"
        )


def _compiled(model: keras.Model) -> bool:
    return bool(getattr(model, "compiled", False)) and getattr(model, "optimizer", None) is not None


def _check_chunks(schedule: Any, chunks: int | None) -> int:
    """Chunks per device: 2 by default for "interleaved", 1 otherwise."""
    if chunks is None:
        return 2 if schedule == "interleaved" else 1
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise PipelineError(f"chunks must be a positive integer, got {chunks!r}.")
    if chunks > 1 and schedule != "interleaved" and not isinstance(schedule, schedules.Schedule):
        raise PipelineError(
            f"chunks={chunks} needs schedule='interleaved' (several model pieces per device); "
            f"schedule {schedule!r} runs one piece per device. Drop chunks or change the schedule."
        )
    return chunks


def _check_replicas(replicas: Any) -> int:
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise PipelineError(
            f"replicas must be a positive integer (data-parallel copies of the pipeline), got "
            f"{replicas!r}."
        )
    return replicas


def _count_stages(
    schedule: Any,
    stages: int | None,
    balance: Sequence[int] | None,
    devices: Sequence[str] | None,
    chunks: int,
    replicas: int = 1,
) -> int:
    """Model pieces to cut: K devices (of each replica) times chunks, or as `balance` or the
    schedule says."""
    if isinstance(schedule, schedules.Schedule):
        return schedule.num_stages
    if balance is not None:
        if stages is not None and stages * chunks != len(balance):
            raise PipelineError(
                f"stages={stages} with chunks={chunks} makes {stages * chunks} stages, but "
                f"balance/split_points give {len(balance)}: make them agree, or give only one."
            )
        return len(balance)
    if stages is None:
        stages = (len(devices) if devices is not None else len(default_devices())) // replicas
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise PipelineError(f"stages must be a positive integer, got {stages!r}.")
    return stages * chunks


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _recompute_flags(recompute: Any, num_stages: int) -> list[bool]:
    """Per-stage recomputation flags from `"never"`, `"except_last"`, `"always"` or a list."""
    modes: dict[str, Callable[[int], bool]] = {
        "never": lambda k: False,
        "always": lambda k: True,
        "except_last": lambda k: k < num_stages - 1,
    }
    if isinstance(recompute, str):
        if recompute not in modes:
            raise PipelineError(
                f"recompute={recompute!r}: use 'never', 'except_last', 'always', or a list with "
                f"one entry per stage ({num_stages} here)."
            )
        return [modes[recompute](k) for k in range(num_stages)]
    flags = list(recompute)
    if len(flags) != num_stages:
        raise PipelineError(
            f"recompute={flags} has {len(flags)} entries for {num_stages} stages: give one per "
            "stage, or 'never' / 'except_last' / 'always'."
        )
    out = []
    for k, flag in enumerate(flags):
        if isinstance(flag, bool):
            out.append(flag)
        elif flag in ("never", "always"):
            out.append(flag == "always")
        else:
            raise PipelineError(
                f"recompute entry {flag!r} for stage {k}: use True/False or 'never'/'always'."
            )
    return out
