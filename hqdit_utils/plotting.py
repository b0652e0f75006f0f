"""The book's figure style and the plots more than one page uses."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from .formats import parse_format

#: One colour per 4-bit format, used by every figure of the book.
FORMAT_COLORS = {
    "int4": "#7f7f7f",
    "fp4_e1m2": "#1f77b4",
    "fp4_e2m1": "#ff7f0e",
    "fp4_e3m0": "#2ca02c",
    "fp32": "#000000",
}


def use_book_style() -> None:
    """Matplotlib defaults for the book: readable sizes, light grid, no top/right spines."""
    plt.rcParams.update({
        "figure.dpi": 110,
        "savefig.dpi": 110,
        "font.size": 10,
        "axes.titlesize": 11,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "legend.frameon": False,
    })


def format_color(name: str) -> str:
    return FORMAT_COLORS.get(str(parse_format(name)), "#9467bd")


def plot_format_grids(formats: Sequence[str], *, normalize: bool = True, ax=None):
    """Draw the non-negative grid values of each format as a row of ticks.

    Args:
        formats: format names, one row each.
        normalize: divide each grid by its maximum so formats of different range compare on [0, 1].
    Returns: the matplotlib Axes.
    """
    ax = ax or plt.gca()
    for row, name in enumerate(formats):
        grid = parse_format(name).grid()
        pos = grid[grid >= 0].double().numpy()
        if normalize:
            pos = pos / pos.max()
        ax.scatter(pos, np.full_like(pos, row), marker="|", s=400, color=format_color(name), linewidths=2)
    ax.set_yticks(range(len(formats)), [str(parse_format(f)) for f in formats])
    ax.set_ylim(-0.6, len(formats) - 0.4)
    ax.set_xlabel("value / max value" if normalize else "value")
    ax.grid(axis="y", visible=False)
    return ax


def plot_histogram_with_grid(x: torch.Tensor, fmt: str, scale: float, *, bins: int = 200, ax=None, label=None):
    """Histogram of ``x`` (log-count) with the scaled grid of ``fmt`` drawn as vertical lines."""
    ax = ax or plt.gca()
    values = x.detach().flatten().double().numpy()
    ax.hist(values, bins=bins, color="#bbbbbb", log=True, label=label)
    for g in (parse_format(fmt).grid().double().numpy() * scale):
        ax.axvline(g, color=format_color(fmt), lw=0.8, alpha=0.8)
    ax.set_title(str(parse_format(fmt)))
    return ax
