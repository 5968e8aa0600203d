"""The timeline plot: a PNG from a simulation or from plain (rank, action, start, end) tuples."""

from __future__ import annotations

import pathlib

import pytest

from tfpipe.schedules import (
    Action,
    Costs,
    dualpipe_v,
    interleaved,
    interleaved_zb,
    looped_bfs,
    one_f_one_b,
    plot,
    simulate,
    zb_h1,
    zb_v,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: pathlib.Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000, len(data)


@pytest.mark.parametrize("schedule,costs", [
    (one_f_one_b(4, 8), Costs(1.0, 2.0)),
    (zb_h1(4, 8), Costs(1.0, 2.0)),
    (interleaved(2, 4, chunks=2), Costs(0.5, 1.0, transfer=0.1)),
    (looped_bfs(2, 4, chunks=2), Costs(0.5, 1.0, transfer=0.1)),
    (zb_v(2, 4), Costs(0.5, 1.0, transfer=0.1)),
    (interleaved_zb(2, 4, chunks=2), Costs(0.5, 1.0, transfer=0.1)),
    (dualpipe_v(2, 4), Costs(0.5, 1.0, transfer=0.1)),  # B, I and W on one stage
])
def test_plot_simulation(tmp_path: pathlib.Path, schedule, costs):
    out = tmp_path / "nested" / f"{schedule.name}.png"
    assert plot(simulate(schedule, costs), out, title=schedule.name) == str(out)
    assert_png(out)


def test_plot_measured_tuples(tmp_path: pathlib.Path):
    measured = [
        (0, Action(0, "F", 0), 0.0, 1.1), (1, "F0", 1.3, 2.2), (1, "B0", 2.2, 4.0),
        (0, "B0", 4.2, 6.3), (0, Action(0, "F", 1), 1.1, 2.0), (1, "1F1", 2.3, 3.0),
    ]
    out = plot(measured, tmp_path / "measured.png", title="measured")
    assert_png(pathlib.Path(out))


def test_plot_rejects_bad_timelines(tmp_path: pathlib.Path):
    with pytest.raises(ValueError, match="timeline is empty"):
        plot([], tmp_path / "empty.png")
    with pytest.raises(ValueError, match=r"entry 0 is .*end >= start"):
        plot([(0, "F0", 2.0, 1.0)], tmp_path / "backwards.png")
    with pytest.raises(ValueError, match=r"entry 0 is \(0, 'F0'\): give \(rank, action, start, end\)"):
        plot([(0, "F0")], tmp_path / "short.png")
