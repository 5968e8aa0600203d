"""The documentation: the site builds with `mkdocs build --strict`, and what the pages show is what the code does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tfpipe import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_site_builds_strict(tmp_path):
    """A broken link or anchor, a missing page or a bad `::: reference` fails this build."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for anchor in ("tfpipe.fit", "tfpipe.Pipeline", "tfpipe.configure_cpu_devices",
                   "tfpipe.schedules.get", "tfpipe.schedules.Schedule",
                   "tfpipe.schedules.simulate.simulate", "tfpipe.schedules.plot.plot"):
        assert f'id="{anchor}"' in api, f"{anchor} missing from the API page"
    assert (site / "img" / "1f1b_predicted.png").exists()
    assert "0.1.0" in (site / "changelog" / "index.html").read_text(encoding="utf-8")


def test_index_first_fit_runs(tmp_path):
    """The "first pipelined fit" on the home page runs as printed."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "index.md").read_text(), re.S)
    code = blocks[0] + '\nassert len(history.history["loss"]) == 2\nprint("ok")\n'
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "CI": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith("ok")


def shown_commands() -> list[tuple[str, list[str], str]]:
    """Every `$ tfpipe schedule ...` block in the docs: (page, arguments, output shown)."""
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        for block in re.findall(r"```\n(\$ tfpipe schedule .*?)```", page.read_text(), re.S):
            command, _, output = block.partition("\n")
            found.append((page.name, command.split()[2:], output))
    return found


@pytest.mark.parametrize("page, args, shown", shown_commands())
def test_shown_schedule_output_is_current(capsys, page, args, shown):
    try:
        cli.main(args)
    except SystemExit:
        pass
    out, err = capsys.readouterr()
    assert out + err == shown, f"docs/{page}: output of tfpipe {' '.join(args)} changed"


def test_shown_grid_in_concepts_is_current():
    import tfpipe

    text = (DOCS / "concepts.md").read_text()
    grid = tfpipe.schedules.format_schedule(tfpipe.schedules.get("1f1b", 3, 4))
    assert f"```\n{grid}\n```" in text
