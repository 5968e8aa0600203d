"""`PipelineOptions`: every option of a pipeline in one frozen value, checked once.

Design: `tfpipe.fit`, `tfpipe.Pipeline` and the planner's `PlanConfig.options` all describe a
pipeline with this one object, so the defaults and the checks of the options live here and
nowhere else. Constructing one checks everything that needs neither the model nor the
visible devices (counts, names, which options go together, and the stage count whenever the
options alone decide it); the two checks that need more are methods called once by
`Pipeline`: `count_stages` (the stage count from the visible devices, when neither `stages`,
`balance`, `split_points`, `devices` nor a `Schedule` gives it) and `recompute_flags` (one
flag per stage, once the stages are known). What needs the model itself (layer counts, layer
names, devices that exist) is checked where the model is split and placed.

This module imports neither TensorFlow nor Keras (only `tfpipe.errors` and the pure-data
`tfpipe.schedules`), so the planner's search can make options without starting TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tfpipe.errors import PipelineError
from tfpipe.schedules import DEFAULT_CHUNKS, Schedule, default_chunks

BALANCE_MODES = ("params", "time", "memory")
"""The names `balance` takes instead of layer counts."""

BATCH_NORM_MODES = ("micro-batch", "deferred")
"""How BatchNormalization's moving statistics are updated (`batch_norm`)."""

RECOMPUTE_MODES = ("never", "except_last", "always")
"""The names `recompute` takes instead of one flag per stage."""

PLANNED = ("stages", "balance", "micro_batches", "schedule", "chunks", "split_points",
           "recompute")
"""The options a `tfpipe.planner.PlanConfig` decides, in the order they are compared."""


@dataclass(frozen=True)
class PipelineOptions:
    """How to pipeline a model: the options of `tfpipe.Pipeline` and `tfpipe.fit`, checked.

    Lists are stored as tuples; a given `chunks` of None becomes the schedule's default (2 for
    `"interleaved"`, else 1). Arguments as for `tfpipe.Pipeline`.

    Attributes:
        stages: K, stages per copy of the pipeline, or None when `balance`, `split_points`,
            `devices`, a `Schedule` or the visible devices decide it.
        balance: `"params"`, `"time"`, `"memory"`, layer calls per stage, or None.
        devices: device names (one per stage, per copy with `replicas`), or None for
            `tfpipe.default_devices()`.
        micro_batches: M, micro-batches per batch.
        schedule: a schedule name or a `tfpipe.schedules.Schedule`.
        chunks: model pieces per device v (2 by default for `"interleaved"`, else 1).
        profile: whether to record each step's timeline.
        split_points: layer names where a new stage starts, or None.
        recompute: `"never"`, `"except_last"`, `"always"`, or one entry per stage.
        check_numerics: whether to stop at the first NaN or Inf.
        replicas: R, data-parallel copies of the pipeline.
        batch_norm: `"micro-batch"` (BatchNormalization's moving statistics updated per
            micro-batch, as Keras would on each) or `"deferred"` (updated once per batch from
            all its micro-batches, as one full-batch step would).
        jit_compile: `"auto"` (XLA on each stage's forward exactly when the model's own
            `jit_compile`, as Keras resolved it at `compile`, is True, and `replicas` is 1),
            `True` or `False` (see `xla`).
        rank_loops: `"auto"` (the steady phase as one in-graph loop over all devices,
            `tfpipe.executor.steadyloop`, where it runs every feature asked for, XLA is off
            and the stages are in one process, else the unrolled step), `"steady"` (that
            loop, or an error naming what it does not run yet), `True` (each device's share
            of a step as one loop, `tfpipe.executor.rankloop`, or an error) or `False`.

    Raises:
        PipelineError: for an option that is not valid whatever the model, or options that
            contradict each other.

    Example:
        >>> options = PipelineOptions(stages=4, micro_batches=8, schedule="1f1b")
        >>> pipe = tfpipe.Pipeline.from_options(model, options)
    """

    stages: int | None = None
    balance: str | Sequence[int] | None = None
    devices: Sequence[str] | None = None
    micro_batches: int = 1
    schedule: str | Schedule = "gpipe"
    chunks: int | None = None
    profile: bool = False
    split_points: Sequence[str] | None = None
    recompute: str | Sequence[str | bool] = "never"
    check_numerics: bool = False
    replicas: int = 1
    batch_norm: str = "micro-batch"
    jit_compile: bool | str = "auto"
    rank_loops: bool | str = "auto"
    _pieces: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("balance", "devices", "recompute"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.split_points, str):
            object.__setattr__(self, "split_points", (self.split_points,))
        elif self.split_points is not None:
            object.__setattr__(self, "split_points", tuple(self.split_points))
        _check_micro_batches(self.micro_batches)
        _check_replicas(self.replicas)
        object.__setattr__(self, "chunks", _check_chunks(self.schedule, self.chunks))
        if self.balance_mode not in (None, *BALANCE_MODES):
            raise PipelineError(
                f"balance={self.balance!r}: use 'params', 'time', 'memory' or a list of layer "
                "counts."
            )
        if self.split_points is not None and self.layer_counts is not None:
            raise PipelineError("Give balance=[...] or split_points=[...], not both.")
        if self.batch_norm not in BATCH_NORM_MODES:
            raise PipelineError(
                f"batch_norm={self.batch_norm!r}: use 'micro-batch' (the default: moving "
                "statistics updated per micro-batch) or 'deferred' (once per batch, from all "
                "its micro-batches)."
            )
        if self.batch_norm == "deferred" and self.replicas > 1:
            raise PipelineError(
                f"batch_norm='deferred' with replicas={self.replicas}: deferred statistics "
                "are combined within one copy of the pipeline only. Use replicas=1, or "
                "batch_norm='micro-batch'."
            )
        _check_jit_compile(self.jit_compile)
        if not (isinstance(self.rank_loops, bool) or self.rank_loops in ("auto", "steady")):
            raise PipelineError(
                f"rank_loops={self.rank_loops!r}: use 'auto' (the default: the steady phase "
                "as one loop over all devices where it runs, else the unrolled step), "
                "'steady' (that loop, or an error naming what it does not run yet), True "
                "(one in-graph loop per device, or an error) or False (the unrolled step)."
            )
        if self.jit_compile is True and self.replicas > 1:
            raise PipelineError(
                f"jit_compile=True with replicas={self.replicas}: every copy of the pipeline "
                "reads the one set of variables on copy 0's devices, and an XLA program cannot "
                "read a variable held on another device. Use replicas=1, or jit_compile=False "
                "('auto' turns XLA off with replicas, as Keras does under a distribution "
                "strategy)."
            )
        object.__setattr__(self, "_pieces", self._known_stages())

    # derived values -------------------------------------------------------------------------

    @property
    def balance_mode(self) -> str | None:
        """`balance` when it names a mode (`"params"`, `"time"`, `"memory"`), else None."""
        return self.balance if isinstance(self.balance, str) else None

    @property
    def layer_counts(self) -> Sequence[int] | None:
        """`balance` when it gives layer calls per stage, else None."""
        return None if isinstance(self.balance, str) else self.balance

    @property
    def balanced_by(self) -> str:
        """What decides the split, as `Pipeline.summary()` words it."""
        if self.balance_mode is not None:
            return self.balance_mode
        return "layer counts" if self.layer_counts is not None or self.split_points else "params"

    @property
    def num_chunks(self) -> int:
        """v, model pieces per device (`chunks` with its default filled in)."""
        return self.chunks if self.chunks is not None else 1

    def xla(self, model_jit_compile: bool) -> bool:
        """Whether stage functions are compiled with XLA: `jit_compile` with `"auto"` resolved.

        Args:
            model_jit_compile: the model's own `jit_compile` as Keras resolved it at `compile`
                (`"auto"` there is True on a machine with a GPU when every layer supports XLA).

        Returns:
            `jit_compile` when it is True or False; for `"auto"`, `model_jit_compile`, but
            False with `replicas` (as Keras turns `"auto"` off under a distribution strategy:
            the copies read variables on other devices, which XLA cannot).
        """
        if isinstance(self.jit_compile, bool):
            return self.jit_compile
        return bool(model_jit_compile) and self.replicas == 1

    def whole_step_xla(self, xla: bool, num_devices: int) -> bool:
        """Whether Keras compiles the whole training step with XLA, as `model.fit` does: with
        `xla` (see `xla`) on one device, one copy and one micro-batch (no split to check at
        run time), without profiling or `check_numerics` (their checks and stamps are not XLA
        operations). Otherwise each stage's functions are compiled on their own.
        """
        return (xla and num_devices == 1 and self.replicas == 1 and self.micro_batches == 1
                and not self.profile and not self.check_numerics)

    def count_stages(self, visible_devices: Callable[[], Sequence[str]]) -> int:
        """Model pieces to cut: K devices (of each replica) times `chunks`, or as `balance`,
        `split_points` or the `Schedule` say.

        Args:
            visible_devices: returns the devices stages go to by default; called only when
                no option decides the count (`tfpipe.default_devices`).

        Returns:
            The number of model pieces (K*v).

        Raises:
            PipelineError: when the visible devices make no stage per copy.
        """
        if self._pieces is not None:
            return self._pieces
        stages = len(visible_devices()) // self.replicas
        return _positive_stages(stages) * self.num_chunks

    def recompute_flags(self, num_stages: int) -> list[bool]:
        """Per-stage recomputation flags from `"never"`, `"except_last"`, `"always"` or a list.

        Args:
            num_stages: the number of model pieces.

        Returns:
            One flag per piece: True to recompute its forward in its backward.

        Raises:
            PipelineError: for an unknown mode, a list of another length, or a bad entry.
        """
        recompute = self.recompute
        modes: dict[str, Callable[[int], bool]] = {
            "never": lambda k: False,
            "always": lambda k: True,
            "except_last": lambda k: k < num_stages - 1,
        }
        if isinstance(recompute, str):
            if recompute not in modes:
                raise PipelineError(
                    f"recompute={recompute!r}: use 'never', 'except_last', 'always', or a list "
                    f"with one entry per stage ({num_stages} here)."
                )
            return [modes[recompute](k) for k in range(num_stages)]
        flags = list(recompute)
        if len(flags) != num_stages:
            raise PipelineError(
                f"recompute={flags} has {len(flags)} entries for {num_stages} stages: give one "
                "per stage, or 'never' / 'except_last' / 'always'."
            )
        out = []
        for k, flag in enumerate(flags):
            if isinstance(flag, bool):
                out.append(flag)
            elif flag in ("never", "always"):
                out.append(flag == "always")
            else:
                raise PipelineError(
                    f"recompute entry {flag!r} for stage {k}: use True/False or "
                    "'never'/'always'."
                )
        return out

    # plans ----------------------------------------------------------------------------------

    @classmethod
    def from_plan(cls, planned: Mapping[str, Any], **given: Any) -> PipelineOptions:
        """The options a planner chose, with the options given next to the plan.

        Args:
            planned: the planned options (`PlanConfig.kwargs()` and its `devices`).
            **given: options as passed to `tfpipe.fit` with `plan=`. `devices` (when not
                None) replaces the planned devices; `profile`, `check_numerics` and
                `replicas` are the caller's; every option in `PLANNED` must be at its
                default or equal the planned value.

        Returns:
            The checked `PipelineOptions`.

        Raises:
            PipelineError: when a given option disagrees with the planned one.
        """
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name in PLANNED}
        chosen: dict[str, Any] = {**defaults, **planned}
        for key in PLANNED:
            if key not in given:
                continue
            value, wanted = given.pop(key), chosen[key]
            listed = isinstance(value, (list, tuple))
            same = (list(value) if listed else value) == wanted
            if value != defaults[key] and not same:
                raise PipelineError(
                    f"{key}={value!r} disagrees with the plan's {key}={wanted!r}: drop {key} "
                    "(the plan sets it) or drop plan= and give every option yourself."
                )
        if given.get("devices") is None:
            given.pop("devices", None)
        return cls(**{**chosen, **given})

    def kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of `tfpipe.Pipeline`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    # checks ---------------------------------------------------------------------------------

    def _known_stages(self) -> int | None:
        """The model pieces to cut when the options decide it (else None), checked."""
        points = self.split_points
        counts = [None] * (len(points) + 1) if points is not None else self.layer_counts
        if isinstance(self.schedule, Schedule):
            pieces = self.schedule.num_stages
            if points is not None and pieces != len(counts or ()):
                raise PipelineError(
                    f"stages={pieces} but split_points={list(points)} make {len(counts or ())} "
                    "stages: give one of them, or make them agree."
                )
            if counts is not None and pieces != len(counts):
                raise PipelineError(
                    f"stages={pieces} but balance={list(counts)} has {len(counts)} entries: "
                    "give one of them, or make them agree."
                )
            return pieces
        chunks = self.num_chunks
        if counts is not None:
            if self.stages is not None and self.stages * chunks != len(counts):
                raise PipelineError(
                    f"stages={self.stages} with chunks={chunks} makes {self.stages * chunks} "
                    f"stages, but balance/split_points give {len(counts)}: make them agree, or "
                    "give only one."
                )
            return len(counts)
        if self.stages is not None:
            return _positive_stages(self.stages) * chunks
        if self.devices is not None:
            return _positive_stages(len(self.devices) // self.replicas) * chunks
        return None


def _positive_stages(stages: Any) -> int:
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise PipelineError(f"stages must be a positive integer, got {stages!r}.")
    return stages


def _check_micro_batches(micro_batches: Any) -> None:
    if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) or micro_batches < 1:
        raise PipelineError(
            f"micro_batches must be a positive integer (the number of slices each batch is cut "
            f"into), got {micro_batches!r}."
        )


def _check_replicas(replicas: Any) -> None:
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise PipelineError(
            f"replicas must be a positive integer (data-parallel copies of the pipeline), got "
            f"{replicas!r}."
        )


def _check_jit_compile(jit_compile: Any) -> None:
    if not isinstance(jit_compile, bool) and not (
        isinstance(jit_compile, str) and jit_compile == "auto"
    ):
        raise PipelineError(
            f"jit_compile={jit_compile!r}: use 'auto' (the default: XLA on each stage's forward "
            "when the model's own jit_compile is True, as Keras's 'auto' makes it on a GPU "
            "machine), True (XLA on every stage) or False (no XLA)."
        )


def _check_chunks(schedule: Any, chunks: Any) -> int:
    """Chunks per device: the schedule's default (`schedules.DEFAULT_CHUNKS`: 2 for
    "interleaved", "looped-bfs", "zb-v", "interleaved-zb" and "dualpipe-v"), 1 otherwise."""
    if chunks is None:
        return default_chunks(schedule) if isinstance(schedule, str) else 1
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise PipelineError(f"chunks must be a positive integer, got {chunks!r}.")
    if chunks > 1 and isinstance(schedule, str) and default_chunks(schedule) == 1:
        several = ", ".join(repr(n) for n in DEFAULT_CHUNKS if n != "interleaved")
        raise PipelineError(
            f"chunks={chunks} needs schedule='interleaved' (or {several}: several model pieces "
            f"per device); schedule {schedule!r} runs one piece per device. Drop chunks or "
            "change the schedule."
        )
    return chunks
