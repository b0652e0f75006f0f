"""Draw the chapter dependency graph of the book: book/figures/chapter-graph.svg.

    python book/figures/chapter_graph.py

The book's Sphinx extension ``book/_ext/book_facts.py`` runs this at the start of every build. The arrows are not
typed in: an arrow A → B means that page B refers back to page A (a link, a reference to one of A's labels, or
the words "chapter N"), as :func:`book_facts.chapter_edges` reads them from the pages' text; arrows implied by a
longer path are left out. A page's row is the length of the longest chain of arrows above it. Matplotlib only,
text drawn as paths: the SVG needs no font and no network.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = Path("book") / "figures" / "chapter-graph.svg"  # under the book's root

# key: (label, kind); the keys are book_facts.GRAPH_PAGES' values
PAGES = {
    "primer": ("FP primer\nExMy grids, scale = bias", "foundation"),
    "model": ("The embedded model\na small DiT, trained here", "foundation"),
    "c1": ("1  Activations\ncalibration, outliers", "chapter"),
    "c2": ("2  Clipping\nsearch over γ", "chapter"),
    "c3": ("3  Hybrid formats\none FP4 grid per layer", "chapter"),
    "c4": ("4  Rotation\nHadamard Q = DH/√n", "chapter"),
    "c5": ("5  GPTQ on FP grids\nerror feedback", "chapter"),
    "c6": ("6  End to end\nimages, per-step error", "chapter"),
    "c7": ("7  sFID tables\nseeds, verdicts", "chapter"),
    "c8": ("8  Beyond the paper\nMXFP4/NVFP4, storage", "chapter"),
    "full": ("Full scale\nDiT-XL/2 on GPUs", "foundation"),
}
COLORS = {"foundation": ("#eef3f8", "#4a6f94"), "chapter": ("#fdf3e7", "#c2791c")}
BOX_W, BOX_H, ROW_H = 1.75, 0.62, 1.0


def edges(root: Path = ROOT) -> list[tuple[str, str]]:
    """The arrows (key, key) of the figure, read from the pages under ``root`` by book_facts."""
    sys.path.insert(0, str(root / "book" / "_ext"))
    try:
        import book_facts
    finally:
        sys.path.remove(str(root / "book" / "_ext"))
    back, _ = book_facts.chapter_edges(root)
    keys = book_facts.GRAPH_PAGES
    return sorted((keys[a], keys[b]) for a, b in book_facts.transitive_reduction(back))


def layout(arrows: list[tuple[str, str]]) -> dict[str, tuple[float, float]]:
    """Centre of each box: row = longest chain of arrows above the page, boxes of a row spread evenly."""
    row = {k: 0 for k in PAGES}
    for _ in PAGES:  # longest path by relaxation (the graph is acyclic: arrows point from earlier pages)
        for a, b in arrows:
            row[b] = max(row[b], row[a] + 1)
    centres = {}
    for r in sorted(set(row.values())):
        keys = [k for k in PAGES if row[k] == r]
        for i, k in enumerate(keys):
            centres[k] = (4.0 * (i + 0.5) / len(keys), -r * ROW_H)
    return centres


def main(root: Path = ROOT) -> Path:
    arrows = edges(root)
    centre = layout(arrows)
    n_rows = 1 + max(int(round(-y / ROW_H)) for _, y in centre.values())
    plt.rcParams.update({"svg.fonttype": "path", "svg.hashsalt": "chapter-graph", "font.size": 9})
    fig, ax = plt.subplots(figsize=(7.2, 1.05 * n_rows + 0.3))
    for key, (label, kind) in PAGES.items():
        x, y = centre[key]
        face, edge = COLORS[kind]
        ax.add_patch(FancyBboxPatch((x - BOX_W / 2, y - BOX_H / 2), BOX_W, BOX_H,
                                    boxstyle="round,pad=0.02,rounding_size=0.08", fc=face, ec=edge, lw=1.4))
        title, sub = label.split("\n")
        ax.text(x, y + 0.1, title, ha="center", va="center", fontweight="bold")
        ax.text(x, y - 0.13, sub, ha="center", va="center", fontsize=8, color="#333333")
    for a, b in arrows:
        (xa, ya), (xb, yb) = centre[a], centre[b]
        skips = round((ya - yb) / ROW_H) > 1  # bend arrows that pass a row, so they miss its boxes
        ax.add_patch(FancyArrowPatch((xa, ya - BOX_H / 2), (xb, yb + BOX_H / 2), arrowstyle="-|>",
                                     mutation_scale=12, lw=1.1, color="#555555",
                                     connectionstyle=f"arc3,rad={-0.35 if skips else 0.0}", shrinkA=2, shrinkB=2))
    ax.set_xlim(-0.5, 4.5)
    ax.set_ylim(-(n_rows - 1) * ROW_H - 0.5, 0.5)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(root / OUT, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return root / OUT


if __name__ == "__main__":
    print(main())
