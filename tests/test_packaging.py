"""The sdist and wheel build offline and carry the package, its `py.typed` marker and the `tfpipe` command."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import tfpipe

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_version_is_the_package_version():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == tfpipe.__version__


def test_sdist_and_wheel(tmp_path):
    # Build from a copy so the checkout gets no egg-info or build/ folder.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "tfpipe", src / "tfpipe",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "CHANGELOG.md"):
        shutil.copy2(ROOT / name, src / name)
    dist = tmp_path / "dist"
    # --no-isolation: use the installed build backend (the test extra has it), no download.
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    version = tfpipe.__version__
    wheel = dist / f"tfpipe-{version}-py3-none-any.whl"
    sdist = dist / f"tfpipe-{version}.tar.gz"
    assert wheel.exists() and sdist.exists(), sorted(p.name for p in dist.iterdir())

    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        info = f"tfpipe-{version}.dist-info"
        metadata = whl.read(f"{info}/METADATA").decode()
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    for path in ("tfpipe/__init__.py", "tfpipe/py.typed", "tfpipe/cli.py", "tfpipe/__main__.py",
                 "tfpipe/schedules/simulate.py", "tfpipe/executor/step.py",
                 "tfpipe/partition/stages.py", "tfpipe/balance/solve.py"):
        assert path in names, path
    assert not any(n.startswith(("tests/", "docs/", "examples/", "benchmarks/")) for n in names)
    assert re.search(r"^\[console_scripts\]\s*\ntfpipe = tfpipe\.cli:main$", entry_points, re.M)
    assert f"Version: {version}" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    assert "Requires-Dist: tensorflow>=2.16" in metadata
    assert "Provides-Extra: docs" in metadata

    with tarfile.open(sdist) as tar:
        members = set(tar.getnames())
    for path in ("pyproject.toml", "README.md", "tfpipe/py.typed", "tfpipe/cli.py"):
        assert f"tfpipe-{version}/{path}" in members, path
