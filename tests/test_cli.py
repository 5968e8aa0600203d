"""The `tfpipe` command line: real `python -m tfpipe` runs for the main paths, `cli.main` in-process for the error variants."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tfpipe import cli
from tfpipe.schedules import default_chunks, min_micro_batches

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

GRID_1F1B_2X3 = """\
schedule '1f1b': 2 stages x 3 micro-batches
step   0   1   2   3   4   5   6   7
rank0  F0  F1  .   B0  F2  B1  .   B2
rank1  .   F0  B0  F1  B1  F2  B2  .
"""


def run_tfpipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Runs `python -m tfpipe ARGS` the way a user would, with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "tfpipe", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=cwd)


def error_lines(stderr: str) -> list[str]:
    """Our error lines, without TensorFlow's start-up log lines."""
    return [line for line in stderr.splitlines() if line.startswith("tfpipe")]


@pytest.fixture(scope="module")
def one_f_one_b(tmp_path_factory):
    """`tfpipe schedule 1f1b --stages 2 --micro-batches 3 --png ...`, run once for several tests."""
    tmp = tmp_path_factory.mktemp("cli")
    png = tmp / "plots" / "1f1b.png"
    proc = run_tfpipe("schedule", "1f1b", "--stages", "2", "--micro-batches", "3",
                      "--png", str(png), cwd=tmp)
    return proc, png


def test_schedule_prints_the_grid(one_f_one_b):
    proc, _ = one_f_one_b
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(GRID_1F1B_2X3), proc.stdout


def test_schedule_prints_simulated_bubble_and_memory(one_f_one_b):
    proc, _ = one_f_one_b
    # K=2, M=3, F=1, B=2: step (M + K - 1)(F + B) = 12, bubble (K-1)/(M+K-1) = 0.25;
    # 1F1B holds K - s micro-batches on stage s.
    assert "step time: 12\n" in proc.stdout
    assert "bubble fraction: 0.2500 (25.0% idle)" in proc.stdout
    assert "peak micro-batches in flight per stage: 2, 1" in proc.stdout


def test_schedule_writes_png(one_f_one_b):
    proc, png = one_f_one_b
    assert f"wrote {png}" in proc.stdout
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000


def test_interleaved_counts_pieces_and_divides_the_bubble(tmp_path):
    proc = run_tfpipe("schedule", "interleaved", "--stages", "2", "--micro-batches", "4",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(
        "schedule 'interleaved': 2 stages x 4 micro-batches, 4 model pieces (2 per rank)\n"
        "step   0    1    2    3    4    5    6    7    8    9    10   11   12   13   14   15   16   17\n"
        "rank0  0F0  0F1  2F0  2F1  0F2  2B0  0F3  2B1  2F2  0B0  2F3  0B1  .    2B2  .    2B3  0B2  0B3\n"
        "rank1  .    1F0  1F1  3F0  3B0  3F1  3B1  1F2  1B0  1F3  1B1  3F2  3B2  3F3  3B3  1B2  1B3  .\n"
    ), proc.stdout
    # (K-1)/(vM+K-1) = 1/9 with v=2 chunks
    assert "bubble fraction: 0.1111" in proc.stdout


def test_unknown_schedule_exits_2_naming_it(tmp_path):
    proc = run_tfpipe("schedule", "pipedream", "--stages", "2", "--micro-batches", "3",
                      cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert error_lines(proc.stderr) == [
        "tfpipe schedule: error: unknown schedule 'pipedream': use one of gpipe, 1f1b, "
        "interleaved, zb-h1, looped-bfs, zb-v, interleaved-zb, dualpipe-v"
    ], proc.stderr
    assert proc.stdout == ""


def test_info_prints_versions_and_devices(tmp_path):
    import keras
    import numpy as np
    import tensorflow as tf

    import tfpipe

    proc = run_tfpipe("info", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == f"tfpipe      {tfpipe.__version__}"
    assert lines[1].startswith(f"TensorFlow  {tf.__version__} (")
    assert lines[2].startswith(f"Keras       {keras.__version__} (backend ")
    assert lines[3] == f"NumPy       {np.__version__}"
    assert lines[4].startswith("Python      ")
    assert "/physical_device:CPU:0  (CPU)" in proc.stdout
    assert "logical devices (" in proc.stdout and "/device:CPU:0  (CPU)" in proc.stdout


# In-process error variants: same `main`, no interpreter start-up per case. ------------------


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    try:
        status = cli.main(list(args))
    except SystemExit as exit_:  # argparse's own exits (usage errors, --help, --version)
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stages", "0", "--micro-batches", "3"],
         "tfpipe schedule: error: argument --stages: must be a positive integer, got '0'"),
        (["--stages", "2", "--micro-batches", "two"],
         "tfpipe schedule: error: argument --micro-batches: must be a positive integer, got 'two'"),
        (["--stages", "2", "--micro-batches", "-1"],
         "tfpipe schedule: error: argument --micro-batches: must be a positive integer, got '-1'"),
        (["--stages", "2", "--micro-batches", "3", "--chunks", "2"],
         "tfpipe schedule: error: --chunks 2 needs a schedule of 'interleaved', 'looped-bfs', "
         "'zb-v', 'interleaved-zb', 'dualpipe-v'; 'gpipe' runs one stage per device"),
        (["--micro-batches", "3"],
         "tfpipe schedule: error: the following arguments are required: --stages"),
    ],
)
def test_bad_sizes_exit_2_with_one_line(capsys, args, message):
    status, out, err = run_main(capsys, "schedule", "gpipe", *args)
    assert status == 2
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith(message), err


def test_no_command_prints_help_and_exits_2(capsys):
    status, out, err = run_main(capsys)
    assert status == 2 and "schedule" in err and "info" in err


def test_version(capsys):
    import tfpipe

    status, out, _ = run_main(capsys, "--version")
    assert status == 0 and out == f"tfpipe {tfpipe.__version__}\n"


def test_png_that_cannot_be_written_exits_1(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    status, out, err = run_main(capsys, "schedule", "gpipe", "--stages", "2",
                                "--micro-batches", "2", "--png", str(blocker / "x.png"))
    assert status == 1 and "bubble fraction" in out
    assert err.startswith("tfpipe schedule: error: cannot write --png") and len(err.splitlines()) == 1


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved", "zb-h1", "looped-bfs", "zb-v",
                                  "interleaved-zb", "dualpipe-v"])
def test_every_schedule_runs(capsys, name):
    m = max(5, min_micro_batches(name, 3))  # dualpipe-v: 2 per device
    status, out, _ = run_main(capsys, "schedule", name, "--stages", "3", "--micro-batches", str(m))
    assert status == 0 and "rank2" in out and "bubble fraction" in out
    if default_chunks(name) == 2:  # interleaved, looped-bfs, zb-v, interleaved-zb, dualpipe-v
        assert "6 model pieces (2 per rank)" in out and "rank3" not in out


def test_dualpipe_v_prints_its_grid_and_zb_vs_bubble(capsys):
    status, out, _ = run_main(capsys, "schedule", "dualpipe-v", "--stages", "2",
                              "--micro-batches", "4")
    assert status == 0
    assert out.startswith(
        "schedule 'dualpipe-v': 2 stages x 4 micro-batches, 4 model pieces (2 per rank)\n"
        "step   0    1    2    3    4    5    6    7    8    9    10   11   12   13   14   15   16   17   18\n"
        "rank0  0F0  0F1  0F2  3F0  3I0  3W0  3F1  0F3  3B1  3F2  0B0  3B2  3F3  0B1  3B3  0I2  0W2  0I3  0W3\n"
        "rank1  .    1F0  2F0  1F1  2F1  1F2  2B0  2F2  1B0  1F3  2B1  2F3  1B1  2B2  1B2  2I3  1I3  2W3  1W3\n"
    ), out
    assert "step time: 12.5\n" in out and "bubble fraction: 0.0400" in out  # ZB-V's 1/25
    assert "peak micro-batches in flight per model piece: 4, 3, 2, 1" in out
    status, out, _ = run_main(capsys, "schedule", "dualpipe-v", "--stages", "4",
                              "--micro-batches", "8")
    assert status == 0 and "bubble fraction: 0.0588" in out  # (K-1)/(6M+K-1) = 3/51
    assert "peak micro-batches in flight per model piece: 8, 7, 6, 5, 4, 3, 2, 1" in out


@pytest.mark.parametrize("args, message", [
    (["--stages", "4", "--micro-batches", "6"],
     "tfpipe schedule: error: Schedule 'dualpipe-v' on 4 devices needs at least 8 micro-batches "
     "(2 per device), but 6 were asked for: use 8 or more, or schedule 'zb-v', which runs any "
     "count. With 8 it runs:"),
    (["--stages", "2", "--micro-batches", "4", "--chunks", "3"],
     "tfpipe schedule: error: Schedule 'dualpipe-v' places two stages on each rank in a V"),
])
def test_dualpipe_v_refusals_exit_2_with_one_line(capsys, args, message):
    status, out, err = run_main(capsys, "schedule", "dualpipe-v", *args)
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith(message), err


def test_zb_v_prints_its_v_and_its_bubble(capsys):
    status, out, _ = run_main(capsys, "schedule", "zb-v", "--stages", "4", "--micro-batches", "8")
    assert status == 0
    assert out.startswith("schedule 'zb-v': 4 stages x 8 micro-batches, 8 model pieces (2 per "
                          "rank)\n"), out
    assert "rank0  0F0  0F1" in out and "rank3  .    .    .    3F0  4F0" in out
    # (K-1)/(6M+K-1) = 3/51 with F = I = W per piece; peak per piece min(2K - s, M)
    assert "bubble fraction: 0.0588" in out
    assert "peak micro-batches in flight per model piece: 8, 7, 6, 5, 4, 3, 2, 1" in out
    status, _, err = run_main(capsys, "schedule", "zb-v", "--stages", "2", "--micro-batches",
                              "2", "--chunks", "3")
    assert status == 2 and "places two stages on each rank in a V" in err


def test_looped_bfs_prints_its_grid_and_interleaved_bubble(capsys):
    status, out, _ = run_main(capsys, "schedule", "looped-bfs", "--stages", "2",
                              "--micro-batches", "4")
    assert status == 0
    assert out.startswith(
        "schedule 'looped-bfs': 2 stages x 4 micro-batches, 4 model pieces (2 per rank)\n"
        "step   0    1    2    3    4    5    6    7    8    9    10   11   12   13   14   15   16   17\n"
        "rank0  0F0  0F1  0F2  0F3  2F0  2F1  2F2  2F3  .    .    2B3  2B2  2B1  2B0  0B3  0B2  0B1  0B0\n"
        "rank1  .    1F0  1F1  1F2  1F3  3F0  3F1  3F2  3F3  3B3  3B2  3B1  3B0  1B3  1B2  1B1  1B0  .\n"
    ), out
    # (K-1)/(vM+K-1) = 1/9 with v=2 chunks, as interleaved; GPipe's memory: M per piece
    assert "bubble fraction: 0.1111" in out
    assert "peak micro-batches in flight per model piece: 4, 4, 4, 4" in out


def test_interleaved_zb_prints_its_grid_and_a_smaller_bubble_than_interleaved(capsys):
    status, out, _ = run_main(capsys, "schedule", "interleaved-zb", "--stages", "2",
                              "--micro-batches", "4")
    assert status == 0
    assert out.startswith(
        "schedule 'interleaved-zb': 2 stages x 4 micro-batches, 4 model pieces (2 per rank)\n"
        "step   0    1    2    3    4    5    6    7    8    9    10   11   12   13   14   15   16   17   18   19   20   21   22   23   24   25\n"
        "rank0  0F0  0F1  2F0  2F1  0F2  2I0  2W0  0F3  2I1  2W1  2F2  0I0  0W0  2F3  0I1  0W1  .    2I2  2W2  .    2I3  0I2  0I3  2W3  0W2  0W3\n"
        "rank1  .    1F0  1F1  3F0  3I0  3W0  3F1  3I1  3W1  1F2  1I0  1W0  1F3  1I1  1W1  3F2  3I2  3W2  3F3  3I3  1I2  1I3  3W3  1W2  1W3  .\n"
    ), out
    # 1/13 against interleaved's 1/9, at interleaved's peak per piece (4, 3, 2, 1)
    assert "bubble fraction: 0.0769" in out
    assert "peak micro-batches in flight per model piece: 4, 3, 2, 1" in out
    status, out, _ = run_main(capsys, "schedule", "interleaved-zb", "--stages", "2",
                              "--micro-batches", "4", "--chunks", "3")
    assert status == 0 and "6 model pieces (3 per rank)" in out and "rank2" not in out
