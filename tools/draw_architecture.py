"""Draws the package's layers (tests/test_architecture.py's LAYERS) as docs/img/architecture.png.

Usage:
    python tools/draw_architecture.py [docs/img/architecture.png]

One band per layer, bottom first, holding its modules; each arrow on the right says a layer
may import from the bands below it. The module list is read from the source tree, so a new
module shows up in its band when the picture is drawn again.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tests.test_architecture import LAYERS, MODULES, layer_of  # noqa: E402

COLOURS = ["#e8f1fb", "#eaf6ea", "#fdf3e1", "#fbe9e9", "#efe9f7", "#e9f5f5", "#f3f3f3"]


def draw(out: Path) -> None:
    bands = [sorted(n.removeprefix("tfpipe.") or "tfpipe" for n in MODULES
                    if layer_of(n) == i) for i in range(len(LAYERS))]
    rows = [textwrap.wrap(", ".join(b), 95) for b in bands]
    heights = [0.5 + 0.28 * len(r) for r in rows]
    fig, ax = plt.subplots(figsize=(12, sum(heights) + 0.6))
    y = 0.0
    for i, ((name, what, _), lines, h) in enumerate(zip(LAYERS, rows, heights)):
        ax.add_patch(plt.Rectangle((0, y), 10, h - 0.08, color=COLOURS[i % len(COLOURS)],
                                   ec="#555", lw=0.8))
        ax.text(0.12, y + h - 0.25, name, fontsize=11, weight="bold", va="center")
        ax.text(1.45, y + h - 0.25, textwrap.shorten(what, 120), fontsize=8, va="center",
                style="italic", color="#333")
        for k, line in enumerate(lines):
            ax.text(1.45, y + h - 0.55 - 0.28 * k, line, fontsize=8.5, va="center",
                    family="monospace")
        if i:
            ax.annotate("", xy=(10.25, y - 0.05), xytext=(10.25, y + h / 2),
                        arrowprops={"arrowstyle": "->", "color": "#555"})
        y += h
    ax.text(10.35, y / 2, "imports only\ndownwards", fontsize=8, va="center", rotation=90)
    ax.set_xlim(-0.1, 10.7)
    ax.set_ylim(-0.1, y + 0.1)
    ax.axis("off")
    ax.set_title("tfpipe's layers (tests/test_architecture.py checks them)", fontsize=12)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    draw(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "img" / "architecture.png")
