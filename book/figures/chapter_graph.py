"""Draw the chapter dependency graph of the book: book/figures/chapter-graph.svg.

    python book/figures/chapter_graph.py

An arrow A → B means "B uses an idea, a measurement or a result of A". The edges are read from the chapters
(which earlier chapter each one refers to); when a chapter moves or gains a prerequisite, change PAGES/EDGES
below and run the script again. Matplotlib only, text drawn as paths: the SVG needs no font and no network.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).with_name("chapter-graph.svg")

# key: (label, row from the top, column position, kind)
PAGES = {
    "primer": ("FP primer\nExMy grids, scale = bias", 0, 0.5, "foundation"),
    "model": ("The embedded model\na small DiT, trained here", 0, 2.5, "foundation"),
    "c1": ("1  Activations\ncalibration, outliers", 1, 2.5, "chapter"),
    "c2": ("2  Clipping\nsearch over γ", 2, 0.5, "chapter"),
    "c4": ("4  Rotation\nHadamard Q = DH/√n", 2, 3.5, "chapter"),
    "c3": ("3  Hybrid formats\none FP4 grid per layer", 3, 0.5, "chapter"),
    "c5": ("5  GPTQ on FP grids\nerror feedback", 3, 3.5, "chapter"),
    "c6": ("6  End to end\nimages, per-step error", 4, 2.0, "chapter"),
    "c7": ("7  sFID tables\nseeds, verdicts", 5, 2.0, "chapter"),
    "c8": ("8  Beyond the paper\nMXFP4/NVFP4, storage", 6, 0.9, "chapter"),
    "full": ("Full scale\nDiT-XL/2 on GPUs", 6, 3.1, "foundation"),
}
EDGES = [
    ("model", "c1"), ("primer", "c2"), ("c1", "c2"), ("c1", "c4"), ("c2", "c3"),
    ("c4", "c5"), ("c3", "c6"), ("c5", "c6"), ("c6", "c7"), ("c7", "c8"), ("c7", "full"),
]  # transitive edges are left out (primer → 3 runs through 2, rotation → 6 through 5)
COLORS = {"foundation": ("#eef3f8", "#4a6f94"), "chapter": ("#fdf3e7", "#c2791c")}
BOX_W, BOX_H, ROW_H = 1.75, 0.62, 1.0


def center(key: str) -> tuple[float, float]:
    _, row, col, _ = PAGES[key]
    return col, -row * ROW_H


def main() -> Path:
    plt.rcParams.update({"svg.fonttype": "path", "svg.hashsalt": "chapter-graph", "font.size": 9})
    fig, ax = plt.subplots(figsize=(7.2, 7.4))
    for key, (label, _, _, kind) in PAGES.items():
        x, y = center(key)
        face, edge = COLORS[kind]
        ax.add_patch(FancyBboxPatch((x - BOX_W / 2, y - BOX_H / 2), BOX_W, BOX_H,
                                    boxstyle="round,pad=0.02,rounding_size=0.08", fc=face, ec=edge, lw=1.4))
        title, sub = label.split("\n")
        ax.text(x, y + 0.1, title, ha="center", va="center", fontweight="bold")
        ax.text(x, y - 0.13, sub, ha="center", va="center", fontsize=8, color="#333333")
    for a, b in EDGES:
        (xa, ya), (xb, yb) = center(a), center(b)
        start = (xa, ya - BOX_H / 2) if ya > yb else (xa + BOX_W / 2, ya)
        end = (xb, yb + BOX_H / 2) if ya > yb else (xb - BOX_W / 2, yb)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, lw=1.1,
                                     color="#555555", connectionstyle="arc3,rad=0.0", shrinkA=2, shrinkB=2))
    ax.set_xlim(-0.5, 4.5)
    ax.set_ylim(-6 * ROW_H - 0.5, 0.5)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(OUT, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return OUT


if __name__ == "__main__":
    print(main())
