"""Stage tables and byte sizes as text.

Design: plain Python over what the caller measured (no TensorFlow or Keras), so the pipeline's
stage table (`Pipeline.summary`) and the planner's messages and tables (`tfpipe.planner`)
format bytes and align columns the same way, and the text can be built from hand-made data.
Stages are read through `StageView`, the few attributes of `tfpipe.partition.Stage` a table
shows; the caller passes what needs the model (activation bytes, the imbalance measure).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol


class StageView(Protocol):
    """What a stage table reads of a stage (`tfpipe.partition.Stage` has it)."""

    @property
    def index(self) -> int: ...

    @property
    def device(self) -> str: ...

    @property
    def names(self) -> Sequence[str]: ...

    @property
    def inputs(self) -> Sequence[Any] | None: ...

    @property
    def num_params(self) -> int: ...


def format_bytes(n: float) -> str:
    """`n` bytes in B, KiB, MiB or GiB, for tables and messages.

    Args:
        n: a number of bytes, >= 0.

    Returns:
        Whole bytes below 1 KiB (`"512 B"`), else one decimal in the largest unit up to GiB.

    Example:
        >>> format_bytes(3 * 2**20)
        '3.0 MiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def text_table(rows: Sequence[Sequence[str]], numeric: set[int]) -> list[str]:
    """Rows of cells as aligned lines, the header underlined with dashes.

    Args:
        rows: the header, then one row per entry, all of the header's length.
        numeric: indices of the columns aligned right (the others align left).

    Returns:
        One line per row, columns two spaces apart and trailing spaces cut, and a line of
        dashes after the header.

    Example:
        >>> text_table([["name", "n"], ["a", "10"]], numeric={1})
        ['name   n', '----  --', 'a     10']
    """
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append(
            "  ".join(
                c.rjust(w) if i in numeric else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths))
            ).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def per_layer(
    stages: Sequence[StageView], figures: Callable[[], list[float]]
) -> list[float] | None:
    """Per-layer-call figures, or None for an opaque model trained as one stage.

    Args:
        stages: the pipeline's stages.
        figures: computes one figure per layer call; not called for an opaque model.

    Returns:
        `figures()`, or None when the first stage has no `inputs` (an opaque model).
    """
    return None if stages[0].inputs is None else figures()


def pipeline_title(
    model_name: str,
    num_stages: int,
    micro_batches: int,
    schedule: str,
    balanced_by: str,
    replica_devices: Sequence[Sequence[str]],
) -> str:
    """The first line of `Pipeline.summary()`.

    Args:
        model_name: the Keras model's name.
        num_stages: the number of stages (model pieces).
        micro_batches: M.
        schedule: the schedule's name.
        balanced_by: what decided the split (`PipelineOptions.balanced_by`).
        replica_devices: each copy's device per stage; copies after the first are listed.

    Returns:
        One line, for example `Pipeline of 'mlp': 2 stages x 4 micro-batches, schedule
        'gpipe', balanced by params`.
    """
    replicas = len(replica_devices)
    return (
        f"Pipeline of {model_name!r}: {num_stages} stages x "
        f"{micro_batches} micro-batches, schedule {schedule!r}, "
        f"balanced by {balanced_by}"
        + (
            f", {replicas} replicas on "
            + "; ".join(", ".join(row) for row in replica_devices[1:])
            if replicas > 1
            else ""
        )
    )


def stage_table(
    stages: Sequence[StageView],
    activation_bytes: Sequence[float] | None,
    layer_seconds: Sequence[float] | None,
    imbalance: Callable[[Sequence[float]], float],
) -> list[str]:
    """The stage table of `Pipeline.summary()` and its closing totals line.

    Args:
        stages: the stages, in order; their layer calls, in order, are the ones
            `activation_bytes` and `layer_seconds` run over.
        activation_bytes: per layer call, output bytes per sample; None or empty shows `-`.
        layer_seconds: per layer call, profiled forward + backward seconds, or None (no
            `time ms` column; the imbalance is then of parameters).
        imbalance: the largest-over-mean measure of per-stage costs
            (`tfpipe.balance.imbalance`).

    Returns:
        The table's lines (header, dashes, one row per stage) and a totals line with the
        parameter count and the imbalance of the balanced cost.
    """
    per_layer_time = None if layer_seconds is None else [s * 1e3 for s in layer_seconds]
    header = ["stage", "layers", "params", "act/sample"]
    if per_layer_time is not None:
        header.append("time ms")
    header.append("device")
    rows, start = [header], 0
    for st in stages:
        n = len(st.names)
        span = st.names[0] if n == 1 else f"{st.names[0]} .. {_short(st.names[0], st.names[-1])}"
        row = [str(st.index), f"{span} ({n})", f"{st.num_params:,}"]
        act = activation_bytes
        row.append(format_bytes(sum(act[start : start + n])) if act else "-")
        if per_layer_time is not None:
            row.append(f"{sum(per_layer_time[start : start + n]):.2f}")
        row.append(st.device)
        rows.append(row)
        start += n
    lines = text_table(rows, {2, 3, 4} if per_layer_time is not None else {2, 3})
    cost = (
        [float(r[4]) for r in rows[1:]]
        if per_layer_time is not None
        else [float(st.num_params) for st in stages]
    )
    lines.append(
        f"Total params: {sum(st.num_params for st in stages):,}; imbalance "
        f"(largest / mean {'time' if per_layer_time else 'params'}): {imbalance(cost):.2f}"
    )
    return lines


def _short(first: str, last: str) -> str:
    """`last` without the nested-model path it shares with `first` (`a/x`, `a/y` -> `y`)."""
    head = first.rpartition("/")[0]
    return last[len(head) + 1 :] if head and last.startswith(head + "/") else last
