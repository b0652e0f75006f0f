"""The tables of chapters 06–08: the paper's numbers, measured tables, the noise level, full-scale results.

* :func:`load_paper` / :func:`paper_sources` — ``data/paper/*.csv`` as display tables; ``unknown`` cells
  stay ``unknown`` (never filled), every row keeps its ``source`` and the source list comes from
  ``data/paper/README.md`` itself.
* :data:`METHODS`, :func:`bit_recipe` — the paper's comparison (INT-RTN, MinMax-FP, SmoothQuant, FPQ,
  GPTQ-INT, HQ-DiT) at W8A8 / W4A8 / W4A4. Registered recipes are used where they exist; the missing
  bit settings of a baseline are derived from its W4A4 recipe by changing the bit widths only.
* :func:`mean_std`, :func:`noise_level`, :func:`paired_difference`, :func:`claim_verdict` — statistics
  over seeds of a :func:`~hqdit_utils.experiments.run_table` frame (runs of one seed share labels and
  noise, so differences between recipes are paired) and the verdict rule of chapter 7.
* :func:`full_scale_results` — the results of ``hqdit reproduce`` runs in ``data/results/<run-id>/``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .config import DATA_DIR
from .recipes import FP8_CANDIDATES, get_recipe

__all__ = ["METHODS", "SETTINGS", "bit_recipe", "load_paper", "paper_sources", "mean_std", "noise_level",
           "paired_difference", "claim_verdict", "full_scale_results", "LOWER_IS_BETTER", "RESULTS_DIR"]

#: Where ``hqdit reproduce`` writes full-scale results (one folder per run id).
RESULTS_DIR = DATA_DIR / "results"
PAPER_DIR = DATA_DIR / "paper"

#: Bit settings, weakest quantization first.
SETTINGS = ("w8a8", "w4a8", "w4a4")

#: The methods of the paper's comparison (MinMax-FP, SmoothQuant, FPQ, GPTQ; their forms:
#: book/choices.md#choices-baselines) plus INT round-to-nearest and HQ-DiT. Value: the registered recipe of each bit setting (None: derived).
METHODS: dict[str, dict[str, str | None]] = {
    "INT-RTN": {"w8a8": "int8", "w4a8": "int4w-a8", "w4a4": "int4-rtn"},
    "MinMax-FP": {"w8a8": "fp4-minmax-w8a8", "w4a8": "fp4-minmax-w4a8", "w4a4": "fp4-minmax"},
    "SmoothQuant": {"w8a8": "smoothquant-int-w8a8", "w4a8": None, "w4a4": "smoothquant-int"},
    "FPQ": {"w8a8": None, "w4a8": None, "w4a4": "fpq"},
    "GPTQ-INT": {"w8a8": None, "w4a8": None, "w4a4": "gptq-int"},
    "HQ-DiT": {"w8a8": "hqdit-w8a8", "w4a8": "hqdit-w4a8", "w4a4": "hqdit-w4a4"},
}

#: Metrics where smaller is better (FID-like); the others (IS, precision, recall, consistency) are larger-better.
LOWER_IS_BETTER = {"FID*", "sFID*", "FID", "sFID"}

_BITS = {"w4a4": (4, 4), "w4a8": (4, 8), "w8a8": (8, 8)}


def bit_recipe(method: str, setting: str):
    """The :class:`~hqdit_utils.recipes.QuantRecipe` of ``method`` (a key of :data:`METHODS`) at ``setting``.

    A registered recipe when there is one; otherwise the method's W4A4 recipe with 8-bit weights and/or
    activations instead of 4-bit (``int8``; FP methods: ``fp8_e4m3``, or the FP8 candidate set for
    per-layer format search), named ``<w4a4 name>-<setting>``. Nothing else changes.
    """
    if method not in METHODS:
        raise KeyError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if setting not in _BITS:
        raise KeyError(f"unknown bit setting {setting!r}; choose one of {list(_BITS)}")
    name = METHODS[method][setting]
    if name is not None:
        return get_recipe(name)
    base = get_recipe(METHODS[method]["w4a4"])
    wb, ab = _BITS[setting]
    changes: dict = {"name": f"{base.name}-{setting}",
                     "description": f"{base.description} — derived here at {setting.upper()} (bit widths only)."}
    for kind, bits in (("weight", wb), ("act", ab)):
        if bits == 8:
            fmt = getattr(base, f"{kind}_format")
            if fmt == "auto":
                changes[f"{kind}_candidates"] = FP8_CANDIDATES
            elif fmt.startswith("int"):
                changes[f"{kind}_format"] = "int8"
            else:
                changes[f"{kind}_format"] = "fp8_e4m3"
    return base.replace(**changes)


# --------------------------------------------------------------------------------------------------
# the paper's numbers
# --------------------------------------------------------------------------------------------------
def paper_sources(readme: "str | Path | None" = None) -> pd.DataFrame:
    """The source abbreviations of ``data/paper`` and what they stand for (parsed from its README)."""
    text = Path(readme or PAPER_DIR / "README.md").read_text()
    rows = []
    for m in re.finditer(r"^- `([^`]+)`: (.+?)(?=^- `|^\s*$|\Z)", text, flags=re.M | re.S):
        rows.append({"source": m.group(1), "what it is": " ".join(m.group(2).split())})
    return pd.DataFrame(rows).set_index("source")


def load_paper(name: str, folder: "str | Path | None" = None) -> pd.DataFrame:
    """``data/paper/<name>.csv`` as strings: every cell exactly as written (``unknown`` stays ``unknown``)."""
    path = Path(folder or PAPER_DIR) / f"{name}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; the paper's numbers live in {PAPER_DIR}")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


# --------------------------------------------------------------------------------------------------
# statistics over seeds
# --------------------------------------------------------------------------------------------------
def _metric_columns(table: pd.DataFrame, metrics: Sequence[str] | None) -> list[str]:
    return list(metrics or [c for c in table.columns if c.endswith("*") or c == "class-consistency"])


def mean_std(table: pd.DataFrame, metrics: Sequence[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per recipe (in first-appearance order): mean and sample std (ddof 1; NaN with one seed) over seeds."""
    metrics = _metric_columns(table, metrics)
    order = list(dict.fromkeys(table["recipe"]))
    g = table.groupby("recipe", sort=False)[metrics]
    return g.mean().loc[order], g.std(ddof=1).loc[order]


def noise_level(table: pd.DataFrame, metrics: Sequence[str] | None = None,
                recipes: Sequence[str] | None = None) -> pd.Series:
    """Typical seed-to-seed standard deviation of each metric: the root-mean-square over recipes of the
    per-recipe std (recipes with ≥ 2 seeds; ``recipes`` restricts the set). NaN when no recipe has 2 seeds."""
    metrics = _metric_columns(table, metrics)
    t = table if recipes is None else table[table["recipe"].isin(recipes)]
    _, std = mean_std(t, metrics)
    return np.sqrt((std ** 2).mean(skipna=True)).rename("seed-to-seed std")


def paired_difference(table: pd.DataFrame, a: str, b: str, metric: str) -> dict:
    """Mean of ``metric(a) − metric(b)`` over the seeds both recipes ran, with its standard error.

    Runs with the same seed share labels and noise, so the per-seed differences are paired. With one
    common seed the standard error is NaN (use :func:`noise_level` to judge). ``better`` says whether
    ``a`` is better than ``b`` by more than two standard errors (None when that cannot be judged).
    """
    x = table[table["recipe"] == a].set_index("seed")[metric]
    y = table[table["recipe"] == b].set_index("seed")[metric]
    common = x.index.intersection(y.index)
    if len(common) == 0:
        raise ValueError(f"{a!r} and {b!r} share no seed in this table")
    d = (x.loc[common] - y.loc[common]).astype(float)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    mean = float(d.mean())
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    better = None if not np.isfinite(se) else bool(sign * mean > 2 * se)
    return {"metric": metric, "a": a, "b": b, "difference": mean, "stderr": se, "seeds": len(d), "a better": better}


# --------------------------------------------------------------------------------------------------
# full-scale results
# --------------------------------------------------------------------------------------------------
def full_scale_results(root: "str | Path | None" = None) -> pd.DataFrame:
    """One row per finished full-scale run in ``<root>/<run-id>/result.json`` (written by ``hqdit
    reproduce``): run id, recipe, metrics and the protocol fields that decide comparability (``proxy
    metrics``: the run used the proxy network, its numbers are starred ones). Empty frame (with the
    columns) when there is none."""
    root = Path(root or RESULTS_DIR)
    cols = ["run", "model", "recipe", "FID", "sFID", "IS", "Precision", "Recall", "samples", "steps", "cfg",
            "reference", "device", "proxy metrics", "finished"]
    rows = []
    for f in sorted(root.glob("*/result.json")) if root.is_dir() else []:
        try:
            r = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        p, m = r.get("protocol", {}), r.get("metrics", {})
        rows.append({"run": f.parent.name, "model": p.get("model"), "recipe": r.get("recipe"),
                     **{k: m.get(k, m.get(k + "*")) for k in ("FID", "sFID", "IS", "Precision", "Recall")},
                     "samples": p.get("samples"), "steps": p.get("steps"), "cfg": p.get("cfg_scale"),
                     "reference": p.get("reference"), "device": p.get("device"),
                     "proxy metrics": any(k.endswith("*") for k in m), "finished": r.get("finished")})
    return pd.DataFrame(rows, columns=cols)


def claim_verdict(table: pd.DataFrame, better: str, worse: str, metrics: Sequence[str],
                  noise: "pd.Series | None" = None) -> dict:
    """Does recipe ``better`` beat recipe ``worse`` on every metric in ``metrics``? The rule of chapter 7.

    Each metric's paired difference (:func:`paired_difference`) counts as a win (loss) when it favours
    ``better`` (``worse``) by more than two standard errors. With a single common seed the standard
    error is taken as ``√2 ×`` the seed-to-seed ``noise`` of that metric (conservative: paired runs
    share their noise). Verdict: ``"reproduced"`` if every metric is a win, ``"not reproduced"`` if any
    is a loss or if none is a win, otherwise ``"inconclusive (within noise)"``; ``"cannot be judged (no
    noise estimate)"`` when no metric has a standard error (one seed and no ``noise``).

    Returns ``{"verdict", "evidence"}``; the evidence lists each metric's difference ± standard error.
    """
    wins = losses = judged = 0
    parts = []
    for m in metrics:
        d = paired_difference(table, better, worse, m)
        se = d["stderr"]
        if not np.isfinite(se) and noise is not None and m in noise and np.isfinite(noise[m]):
            se = float(np.sqrt(2.0) * noise[m])
        sign = -1.0 if m in LOWER_IS_BETTER else 1.0
        gain = sign * d["difference"]
        if np.isfinite(se):
            judged += 1
            wins += gain > 2 * se
            losses += gain < -2 * se
        parts.append(f"{m}: {d['difference']:+.3g} ± {se:.2g}" if np.isfinite(se) else f"{m}: {d['difference']:+.3g}")
    if not judged:
        verdict = "cannot be judged (no noise estimate)"
    elif wins == len(metrics):
        verdict = "reproduced"
    elif losses or not wins:
        verdict = "not reproduced"
    else:
        verdict = "inconclusive (within noise)"
    seeds = paired_difference(table, better, worse, metrics[0])["seeds"]
    return {"verdict": verdict,
            "evidence": f"{better} − {worse} ({seeds} paired seed{'s' if seeds > 1 else ''}): " + "; ".join(parts)}
