"""Draws a timeline (simulated or measured) as a PNG: one row per rank, one bar per action.

The same picture serves a `Simulation` and a timeline measured by the executor, given as
plain `(rank, action, start, end)` tuples, so predicted and real runs can be compared side by
side. matplotlib is imported inside `plot` only, and through its object-oriented Agg canvas
rather than `pyplot`, so importing this package never needs matplotlib and drawing never
changes the caller's global matplotlib backend or figure state.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tfpipe.schedules.actions import Action

if TYPE_CHECKING:
    from tfpipe.schedules.simulate import Simulation

COLORS: dict[str, str] = {"F": "#4C72B0", "B": "#55A868", "I": "#DD8452", "W": "#8172B3"}
LABELS: dict[str, str] = {
    "F": "F forward",
    "B": "B backward",
    "I": "I input grad",
    "W": "W weight grad",
}


def plot(
    simulation_or_timeline: Simulation | Iterable[tuple[int, Action | str, float, float]],
    path: str | os.PathLike[str],
    title: str | None = None,
) -> str:
    """Writes a timeline PNG: ranks as rows, time along x, a bar per action coloured by kind.

    Args:
        simulation_or_timeline: a `Simulation`, or `(rank, action, start, end)` tuples where
            `action` is an `Action` or its text (`"F3"`, `"2B3"`), for example a timeline
            measured by the executor.
        path: where to write the PNG; missing parent folders are created.
        title: the figure title; defaults to the schedule's name and its step time and bubble
            for a `Simulation`, or to "timeline".

    Returns:
        `path`, as a string.

    Raises:
        ValueError: for an empty timeline, a negative rank or an action that ends before it
            starts.
        ImportError: if matplotlib is not installed.

    Example:
        >>> from tfpipe.schedules import Costs, one_f_one_b, simulate
        >>> import tempfile, os
        >>> out = os.path.join(tempfile.mkdtemp(), "1f1b.png")
        >>> plot(simulate(one_f_one_b(4, 8), Costs(1.0, 2.0)), out) == out
        True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows, default_title = _rows(simulation_or_timeline)
    num_ranks = 1 + max(r for r, _, _, _ in rows)
    t0 = min(s for _, _, s, _ in rows)
    t1 = max(e for _, _, _, e in rows)
    span = (t1 - t0) or 1.0
    multi = any(a.stage != r for r, a, _, _ in rows)
    width = min(24.0, max(8.0, 0.25 * len(rows) / num_ranks))
    fig = Figure(figsize=(width, 1.2 + 0.55 * num_ranks), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    points_per_unit = (width * 0.8 * 72) / span
    for rank, action, start, end in rows:
        y = num_ranks - 1 - rank
        chunk = action.stage // num_ranks if multi else 0
        ax.barh(
            y,
            end - start,
            left=start,
            height=0.8,
            color=COLORS[action.kind],
            alpha=1.0 - 0.3 * (chunk % 2),
            edgecolor="white",
            linewidth=0.6,
        )
        label = str(action.micro_batch)
        if (end - start) * points_per_unit >= 5.0 * len(label):
            ax.text(
                (start + end) / 2, y, label, ha="center", va="center", fontsize=7, color="white"
            )
    ax.set_yticks(range(num_ranks))
    ax.set_yticklabels([f"rank{r}" for r in reversed(range(num_ranks))])
    ax.set_xlim(t0, t0 + span)
    ax.set_ylim(-0.6, num_ranks - 0.4)
    ax.set_xlabel("time")
    ax.grid(axis="x", linestyle=":", linewidth=0.5)
    kinds = [k for k in COLORS if any(a.kind == k for _, a, _, _ in rows)]
    ax.legend(
        handles=[Patch(color=COLORS[k], label=LABELS[k]) for k in kinds],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
        frameon=False,
    )
    extra = " (lighter bars: odd model chunks)" if multi else ""
    ax.set_title((title if title is not None else default_title) + extra, fontsize=10)
    fig.tight_layout()
    out = os.fspath(path)
    parent = os.path.dirname(out)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _rows(source: Any) -> tuple[list[tuple[int, Action, float, float]], str]:
    """Normalises a `Simulation` or tuples into `(rank, Action, start, end)` rows and a title.

    `source` is duck-typed (`Any`): anything with a `timeline` attribute is read as a
    `Simulation`, anything else as an iterable of tuples, checked entry by entry below.
    """
    timeline = getattr(source, "timeline", None)
    if timeline is not None:
        sched = source.schedule
        title = (
            f"{sched.name}: {sched.num_stages} stages, {sched.num_micro_batches} "
            f"micro-batches, step {source.step_time:.4g}, "
            f"bubble {100 * source.bubble_fraction:.1f}%"
        )
    else:
        timeline, title = source, "timeline"
    rows: list[tuple[int, Action, float, float]] = []
    for n, item in enumerate(timeline):
        try:
            rank, action, start, end = item
        except (TypeError, ValueError):
            raise ValueError(
                f"Timeline entry {n} is {item!r}: give (rank, action, start, end) tuples."
            ) from None
        if isinstance(action, str):
            action = Action.parse(action, stage=int(rank))
        rank, start, end = int(rank), float(start), float(end)
        if rank < 0 or end < start:
            raise ValueError(f"Timeline entry {n} is {item!r}: rank must be >= 0 and end >= start.")
        rows.append((rank, action, start, end))
    if not rows:
        raise ValueError("Nothing to plot: the timeline is empty.")
    return rows, title
