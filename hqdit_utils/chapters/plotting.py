"""The book's figure style and the plots more than one page uses."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.patches import Patch

from ..engine.formats import parse_format
from ..engine.layers import short_layer_name
from ..engine.stats import HIST_BINS, hist_bin_edges

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


def plot_abs_histogram(stats, *, ax=None, label=None, color=None, density: bool = True):
    """Log-log histogram of ``|x|`` in exact 1/8-octave bins, from a :class:`~hqdit_utils.engine.stats.TensorStats` or a tensor
    (e.g. a weight), binned the same way.

    The y-axis is the fraction of elements per octave, so histograms of tensors of different sizes and
    ranges compare directly.
    """

    ax = ax or plt.gca()
    if isinstance(stats, torch.Tensor):
        codes = (stats.detach().abs().to(torch.float32).reshape(-1).view(torch.int32) >> 20)
        hist = torch.bincount(codes, minlength=HIST_BINS)[:HIST_BINS].double()
    else:
        hist = stats.hist.double()
    nz = torch.nonzero(hist[1:]).flatten() + 1  # bin 0 holds exact zeros, which a log axis cannot show
    lo, hi = int(nz.min()), int(nz.max()) + 1
    edges = hist_bin_edges()[lo:hi + 1].numpy()
    counts = hist[lo:hi].numpy()
    if density:
        counts = counts / counts.sum() * 8  # 8 bins per octave → fraction per octave
    ax.stairs(counts, edges, label=label, **({"color": color} if color else {}))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("|x|")
    ax.set_ylabel("fraction per octave" if density else "count")
    return ax


def plot_heatmap(table, *, ax=None, cmap: str = "viridis", log: bool = True, cbar_label: str = "", fmt_cols=None):
    """Heat map of a pandas table (rows × columns), optionally on a log colour scale, with a colour bar."""

    ax = ax or plt.gca()
    values = table.to_numpy(dtype=float)
    norm = LogNorm(vmin=np.nanmin(values[values > 0]), vmax=np.nanmax(values)) if log else None
    im = ax.imshow(values, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_yticks(range(len(table.index)), [str(i) for i in table.index])
    cols = [fmt_cols(c) for c in table.columns] if fmt_cols else [str(c) for c in table.columns]
    ax.set_xticks(range(len(cols)), cols, rotation=90)
    ax.grid(False)
    plt.colorbar(im, ax=ax, label=cbar_label)
    return ax


def plot_format_plan(plan, *, ax=None):
    """A two-row map (weight, activation) × layers, each cell coloured by its chosen format.

    ``plan``: a :class:`~hqdit_utils.engine.format_select.FormatPlan`.
    """

    ax = ax or plt.gca()
    names = list(plan.layers)
    formats = list(plan.candidates)
    code = {f: i for i, f in enumerate(formats)}
    grid = np.array([[code.get(plan[n].weight_format, -1) for n in names],
                     [code.get(plan[n].act_format, -1) for n in names]], dtype=float)
    cmap = ListedColormap([format_color(f) for f in formats])
    ax.imshow(np.ma.masked_less(grid, 0), cmap=cmap, vmin=-0.5, vmax=len(formats) - 0.5, aspect="auto",
              interpolation="nearest")
    ax.set_yticks([0, 1], ["weight", "activation"])
    ax.set_xticks(range(len(names)), [short_layer_name(n) for n in names], rotation=90, fontsize=8)
    ax.grid(False)
    ax.legend(handles=[Patch(color=format_color(f), label=f) for f in formats], loc="upper left",
              bbox_to_anchor=(1.0, 1.0))
    return ax


def describe_format_split(hist: "dict[str, int]", what: str) -> str:
    """The words for a format histogram (``FormatPlan.histogram``), to go with :func:`plot_format_plan`:
    'every weight chose E1M2' or 'the activations split 30 E2M1, 6 E3M0' (short format names, most used first)."""
    short = {f: f.split("_")[-1].upper() for f in hist}
    if len(hist) == 1:
        return f"every {what} chose {short[next(iter(hist))]}"
    parts = ", ".join(f"{n} {short[f]}" for f, n in sorted(hist.items(), key=lambda kv: -kv[1]))
    return f"the {what}s split {parts}"


def plot_image_panels(panels: "dict[str, np.ndarray]", *, ncols: int = 3, panel_width: float = 3.4, axes=None,
                      title_size: int = 10):
    """Show tiled uint8 images (e.g. from ``sampling.tile``) side by side, one titled panel each.

    ``panels``: title → ``[H, W, C]`` uint8 image (C = 1 is shown in grey). ``axes``: optional array of
    Axes to draw into (one per panel, extra Axes are hidden). Returns the figure.
    """
    n = len(panels)
    if axes is None:
        nrows = (n + ncols - 1) // ncols
        first = next(iter(panels.values())) if n else np.zeros((1, 1, 1))
        aspect = first.shape[0] / first.shape[1]
        fig, axes = plt.subplots(nrows, ncols, figsize=(panel_width * ncols, panel_width * aspect * nrows + 0.45 * nrows),
                                 squeeze=False)
    axes = np.asarray(axes).reshape(-1)
    for ax in axes:
        ax.axis("off")
    for ax, (title, img) in zip(axes, panels.items()):
        img = np.asarray(img)
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                  vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title, fontsize=title_size)
    fig = axes[0].figure
    fig.tight_layout()
    return fig


def plot_step_errors(frames: "dict[str, object]", column: str, *, ax=None, log: bool = True):
    """One line per recipe of a per-step error (a ``trajectory.trajectory_error`` column) against the
    sampling step (noisy → clean). ``frames``: label → DataFrame with ``step`` and ``column``."""
    ax = ax or plt.gca()
    for label, df in frames.items():
        y = df[column].where(df[column] > 0) if log else df[column]  # log axes: zeros are not drawn
        ax.plot(df["step"], y, marker="o", ms=3, label=label)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("sampling step (noisy → clean)")
    ax.set_ylabel(column)
    return ax


def plot_metric_bars(mean, std=None, *, metric: str, reference: str | None = None, noise: float | None = None,
                     ax=None, color: str = "#1f77b4", highlight: "Sequence[str]" = ()):
    """``mean[metric]`` per recipe as a dot with ±std error bars (a dot plot, so that small differences
    between rows stay visible: the axis does not start at 0); a dashed line at the ``reference`` recipe
    (FP32) and a shaded band of ± ``noise`` around it (the seed-to-seed noise)."""
    ax = ax or plt.gca()
    names = list(mean.index)
    y = np.arange(len(names))[::-1]
    vals = mean[metric].to_numpy(dtype=float)
    err = None if std is None else np.nan_to_num(std[metric].to_numpy(dtype=float))
    for i, n in enumerate(names):
        ax.errorbar(vals[i], y[i], xerr=None if err is None else err[i], fmt="o", ms=6, capsize=3,
                    color="#d62728" if n in highlight else color)
    ax.set_yticks(y, names)
    ax.set_ylim(-0.6, len(names) - 0.4)
    if reference is not None and reference in mean.index:
        ref = float(mean.loc[reference, metric])
        ax.axvline(ref, color="k", ls="--", lw=1)
        if noise is not None and np.isfinite(noise):
            ax.axvspan(ref - noise, ref + noise, color="k", alpha=0.08, lw=0)
    ax.set_xlabel(metric)
    ax.grid(axis="y", visible=False)
    return ax
