"""Pipeline schedules as pure data: generators, validator, clock, text grid, simulator, plot.

Nothing in this package imports TensorFlow or Keras (matplotlib is imported only inside
`plot`), so schedules can be built, checked, timed and drawn anywhere, and the executor only
interprets the resulting data.

Registry convention: every `GENERATORS` entry is called as
`generator(num_stages, num_micro_batches, chunks=1)`, where `num_stages` counts the model's
pieces (virtual stages) and `chunks` is how many of them each rank holds, so the schedule runs
on `num_stages // chunks` ranks. Single-stage-per-rank schedules (`gpipe`, `1f1b`, `zb-h1`)
accept only `chunks=1`; `interleaved`, `interleaved-zb` and `looped-bfs` accept any `chunks`
that divides `num_stages` (with `chunks=1` they are `1f1b`, 1F1B with the backward split, and
GPipe); `zb-v` and `dualpipe-v` take only `chunks=2` (their V places two stages on each
rank: `FIXED_CHUNKS`). `DEFAULT_CHUNKS` names the schedules that hold several stages per rank,
with the `chunks` to use when none is given; `min_micro_batches` says how many micro-batches a
schedule needs (`dualpipe-v`: two per rank, else one).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from tfpipe.schedules.actions import KINDS, Action, Schedule
from tfpipe.schedules.clock import clock, dependencies
from tfpipe.schedules.dualpipe_v import dualpipe_v, dualpipe_v_stages
from tfpipe.schedules.format import format_schedule
from tfpipe.schedules.gpipe import gpipe
from tfpipe.schedules.interleaved import interleaved, interleaved_stages
from tfpipe.schedules.interleaved_zb import interleaved_zb, interleaved_zb_stages
from tfpipe.schedules.looped_bfs import looped_bfs, looped_bfs_stages
from tfpipe.schedules.one_f_one_b import one_f_one_b
from tfpipe.schedules.plot import plot
from tfpipe.schedules.simulate import Costs, Simulation, peak_in_flight, simulate
from tfpipe.schedules.validate import ScheduleError, validate
from tfpipe.schedules.zb_h1 import zb_h1
from tfpipe.schedules.zb_v import zb_v, zb_v_stages

Generator = Callable[..., Schedule]


def _one_stage_per_rank(name: str, generator: Callable[[int, int], Schedule]) -> Generator:
    """Adapts `generator(K, M)` to the registry form `(K, M, chunks=1)`."""

    @functools.wraps(generator)
    def generate(num_stages: int, num_micro_batches: int, chunks: int = 1) -> Schedule:
        if chunks != 1:
            raise ValueError(
                f"Schedule {name!r} runs one stage per rank, but chunks={chunks!r} was asked "
                f"for: use chunks=1, or schedule='interleaved' to give each rank {chunks!r} "
                "stages."
            )
        return generator(num_stages, num_micro_batches)

    return generate


GENERATORS: dict[str, Generator] = {
    "gpipe": _one_stage_per_rank("gpipe", gpipe),
    "1f1b": _one_stage_per_rank("1f1b", one_f_one_b),
    "interleaved": interleaved_stages,
    "zb-h1": _one_stage_per_rank("zb-h1", zb_h1),
    "looped-bfs": looped_bfs_stages,
    "zb-v": zb_v_stages,
    "interleaved-zb": interleaved_zb_stages,
    "dualpipe-v": dualpipe_v_stages,
}

DEFAULT_CHUNKS: dict[str, int] = {
    "interleaved": 2, "looped-bfs": 2, "zb-v": 2, "interleaved-zb": 2, "dualpipe-v": 2}
"""The schedules that hold several stages (chunks) per rank, with their default `chunks`;
every other name of `GENERATORS` runs one stage per rank (`chunks=1`)."""

FIXED_CHUNKS: frozenset[str] = frozenset({"zb-v", "dualpipe-v"})
"""The schedules of `DEFAULT_CHUNKS` that run only with their default `chunks` (a V)."""

MICRO_BATCHES_PER_RANK: dict[str, int] = {"dualpipe-v": 2}
"""The schedules that need a least number of micro-batches per rank (see `min_micro_batches`)."""


def default_chunks(name: str) -> int:
    """The `chunks` a schedule name runs with when none is given: `DEFAULT_CHUNKS`, else 1.

    Example:
        >>> default_chunks("interleaved"), default_chunks("1f1b")
        (2, 1)
    """
    return DEFAULT_CHUNKS.get(name, 1)


def min_micro_batches(name: str, num_ranks: int) -> int:
    """The fewest micro-batches schedule `name` runs on `num_ranks` ranks (devices).

    Example:
        >>> min_micro_batches("dualpipe-v", 4), min_micro_batches("zb-v", 4)
        (8, 1)
    """
    return max(1, MICRO_BATCHES_PER_RANK.get(name, 0) * num_ranks)


def get(
    name_or_schedule: str | Schedule,
    num_stages: int,
    num_micro_batches: int,
    chunks: int = 1,
) -> Schedule:
    """Resolves a schedule name (or a user-made `Schedule`) and validates it.

    Args:
        name_or_schedule: one of `GENERATORS`' names, or a `Schedule`.
        num_stages: K, the number of model stages (virtual stages when `chunks > 1`).
        num_micro_batches: M, the micro-batch count.
        chunks: stages per rank; the schedule runs on `K // chunks` ranks. Only
            the schedules of `DEFAULT_CHUNKS` (or a user `Schedule` with that many ranks) take
            `chunks > 1`.

    Returns:
        A validated `Schedule` for K stages and M micro-batches.

    Raises:
        ValueError: for an unknown name, a user schedule of another size or rank count, a
            `chunks` the schedule cannot use, or fewer micro-batches than it needs
            (`min_micro_batches`; a `PipelineError` with the grid for `dualpipe-v`).
        ScheduleError: for a schedule that breaks a rule (with its grid).

    Example:
        >>> get("1f1b", 2, 3).to_text()
        ['F0 F1 B0 F2 B1 B2', 'F0 B0 F1 B1 F2 B2']
        >>> get("interleaved", 4, 4, chunks=2).num_ranks
        2
    """
    if isinstance(name_or_schedule, Schedule):
        sched = name_or_schedule
        if (sched.num_stages, sched.num_micro_batches) != (num_stages, num_micro_batches):
            raise ValueError(
                f"Schedule {sched.name!r} is for {sched.num_stages} stages x "
                f"{sched.num_micro_batches} micro-batches, but the pipeline has {num_stages} "
                f"stages x {num_micro_batches} micro-batches: build it for that size."
            )
        if chunks != 1 and sched.num_ranks * chunks != num_stages:
            raise ValueError(
                f"Schedule {sched.name!r} runs {num_stages} stages on {sched.num_ranks} ranks, "
                f"but chunks={chunks} asks for {num_stages} // {chunks} ranks: build it with "
                f"{chunks} stages per rank, or leave chunks at 1 to use its own placement."
            )
        return validate(sched)
    if name_or_schedule not in GENERATORS:
        raise ValueError(
            f"Unknown schedule {name_or_schedule!r}: use one of {sorted(GENERATORS)} or pass "
            "a tfpipe.schedules.Schedule."
        )
    return validate(GENERATORS[name_or_schedule](num_stages, num_micro_batches, chunks))


__all__ = [
    "KINDS",
    "Action",
    "Costs",
    "DEFAULT_CHUNKS",
    "FIXED_CHUNKS",
    "GENERATORS",
    "MICRO_BATCHES_PER_RANK",
    "Generator",
    "Schedule",
    "ScheduleError",
    "Simulation",
    "clock",
    "default_chunks",
    "dependencies",
    "dualpipe_v",
    "dualpipe_v_stages",
    "format_schedule",
    "get",
    "gpipe",
    "interleaved",
    "interleaved_stages",
    "interleaved_zb",
    "interleaved_zb_stages",
    "looped_bfs",
    "looped_bfs_stages",
    "min_micro_batches",
    "one_f_one_b",
    "peak_in_flight",
    "plot",
    "simulate",
    "validate",
    "zb_h1",
    "zb_v",
    "zb_v_stages",
]
