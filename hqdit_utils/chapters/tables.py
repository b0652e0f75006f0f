"""The tables of chapters 06–08: the paper's numbers, measured tables, the noise level, full-scale results.

* :func:`load_paper` / :func:`paper_sources` — ``data/paper/*.csv`` as display tables; ``unknown`` cells
  stay ``unknown`` (never filled), every row keeps its ``source`` and the source list comes from
  ``data/paper/README.md`` itself.
* :data:`METHODS`, :func:`bit_recipe` — the paper's comparison (INT-RTN, MinMax-FP, SmoothQuant, FPQ,
  GPTQ-INT, HQ-DiT) at W8A8 / W4A8 / W4A4. Registered recipes are used where they exist; the missing
  bit settings of a baseline are derived from its W4A4 recipe by changing the bit widths only.
* :func:`mean_std`, :func:`noise_level`, :func:`paired_difference` — statistics over seeds of a
  :func:`~hqdit_utils.runs.experiments.run_table` frame (runs of one seed share calibration trajectories,
  labels and noise, so differences between recipes are paired).
* :func:`paired_interval`, :func:`compare`, :func:`claim_verdict`, :func:`require_same_seeds` — chapter 7's
  rule: a paired t-interval (t quantile for the actual degrees of freedom) on the primary metric
  (:data:`PRIMARY`, sFID*) decides; the secondary metrics (:data:`SECONDARY`) are reported as "k of m agree".
* :func:`chapter7_rows`, :func:`chapter7_family` — chapter 7's rows and its family of comparisons, declared
  once here so that the chapter and the book's results page judge the same comparisons;
  :func:`hard_regime_rows`, :func:`hard_regime_family` — the same for its second table, the hard regime (W4A3).
* :func:`full_scale_results` — the results of ``hqdit reproduce`` runs in ``data/results/<run-id>/``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..config import DATA_DIR
from ..engine.recipes import ADD_ONE, FP8_CANDIDATES, REMOVE_ONE, W4A3_BASES, get_recipe, w4a3_name
from .fidelity import FEATURE, RMS

__all__ = ["METHODS", "SETTINGS", "bit_recipe", "load_paper", "paper_sources", "mean_std", "noise_level",
           "paired_difference", "paired_differences", "paired_interval", "compare", "compare_frame", "claim_verdict", "require_same_seeds",
           "full_scale_results", "chapter7_rows", "chapter7_family", "hard_regime_rows", "hard_regime_family", "LOWER_IS_BETTER", "RESULTS_DIR", "PRIMARY", "SECONDARY", "LEVEL"]

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

#: Metrics where smaller is better (FID-like, and the distances to FP32 of :mod:`.fidelity`); the others (IS,
#: precision, recall, consistency, PSNR to FP32) are larger-better.
LOWER_IS_BETTER = {"FID*", "sFID*", "FID", "sFID", "KID*", "KID", FEATURE, RMS}

#: Chapter 7's declared primary metric (the paper's headline metric): it alone decides a verdict.
PRIMARY = "sFID*"
#: The secondary metrics: reported next to every verdict as "k of m agree", never deciding it.
SECONDARY = ("FID*", "IS*", "P*", "R*", "class-consistency", "KID*")
#: Confidence level of the paired t-intervals.
LEVEL = 0.95

_BITS = {"w4a4": (4, 4), "w4a8": (4, 8), "w8a8": (8, 8)}


def bit_recipe(method: str, setting: str):
    """The :class:`~hqdit_utils.engine.recipes.QuantRecipe` of ``method`` (a key of :data:`METHODS`) at ``setting``.

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
    """The source abbreviations of ``data/paper``, what they stand for and their address (``link``, empty
    when none was recorded), parsed from its README (``- `name` (URL): text``)."""
    text = Path(readme or PAPER_DIR / "README.md").read_text()
    rows = []
    for m in re.finditer(r"^- `([^`]+)`(?: \((https?://[^)\s]+)\))?: (.+?)(?=^- `|^\s*$|\Z)", text, flags=re.M | re.S):
        rows.append({"source": m.group(1), "what it is": " ".join(m.group(3).split()), "link": m.group(2) or ""})
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
# chapter 7's design: its rows and its pre-declared family of comparisons
# --------------------------------------------------------------------------------------------------
def chapter7_rows() -> dict[str, list[str]]:
    """Chapter 7's rows by group (recipe names; FP32 first)."""
    return {
        "paper's comparison": ["fp32"] + [bit_recipe(m, "w4a4").name for m in METHODS],
        "hardware block formats": ["nvfp4", "mxfp4", "nvfp4-rot-gptq", "mxfp4-rot"],
        "HQ-DiT variants": ["hqdit-w4a4-dyn", "hqdit-w4a4-all-fc", "hqdit-w4a4-attn",
                            bit_recipe("HQ-DiT", "w8a8").name, bit_recipe("HQ-DiT", "w4a8").name],
        "remove one component from HQ-DiT": list(REMOVE_ONE.values()),
        "add one component to FP4 round-to-nearest": list(ADD_ONE.values()),
    }


def chapter7_family() -> pd.DataFrame:
    """The family of comparisons chapter 7 judges, fixed before any number is read: one row per (A, B) with
    its ``group`` — HQ-DiT vs FP32; HQ-DiT vs each baseline; each block format and HQ-DiT variant vs HQ-DiT;
    HQ-DiT vs HQ-DiT without each ingredient; FP4 round-to-nearest with each ingredient vs without
    (``fp4-minmax``); MinMax-FP vs INT-RTN (the abstract's "FP fits DiT better than INT")."""
    rows = chapter7_rows()
    hq = bit_recipe("HQ-DiT", "w4a4").name
    base = [bit_recipe(m, "w4a4").name for m in METHODS if m != "HQ-DiT"]
    pairs = [(hq, "fp32", "HQ-DiT vs FP32")]
    pairs += [(hq, b, "HQ-DiT vs a baseline") for b in base]
    pairs += [(r, hq, "block format vs HQ-DiT") for r in rows["hardware block formats"]]
    pairs += [(r, hq, "HQ-DiT variant vs HQ-DiT") for r in rows["HQ-DiT variants"]]
    pairs += [(hq, r, f"remove one: {c}") for c, r in REMOVE_ONE.items()]
    pairs += [(r, "fp4-minmax", f"add one: {c}") for c, r in ADD_ONE.items()]
    pairs += [(bit_recipe("MinMax-FP", "w4a4").name, bit_recipe("INT-RTN", "w4a4").name, "FP vs INT")]
    return pd.DataFrame(pairs, columns=["A", "B", "group"])


def hard_regime_rows() -> list[str]:
    """Chapter 7's second table (ours): FP32 and the W4A3 form of every recipe of
    :data:`~hqdit_utils.engine.recipes.W4A3_BASES` (the paper's baselines, FP4 round-to-nearest with and without
    the rotation, HQ-DiT with and without it) — 3-bit activations, where 4-bit-class quantization hurts the
    embedded model."""
    return ["fp32"] + [w4a3_name(b) for b in W4A3_BASES]


def hard_regime_family() -> pd.DataFrame:
    """The second table's family, fixed before any number is read (columns ``A``, ``B``, ``group``): HQ-DiT,
    FP4 round-to-nearest and rotation-only against FP32; HQ-DiT against each of the paper's baselines; HQ-DiT
    without the rotation against HQ-DiT (remove one) and rotation-only against round-to-nearest (add one);
    MinMax-FP against INT-RTN."""
    a3 = {b: w4a3_name(b) for b in W4A3_BASES}
    hq, rtn, rot = a3["hqdit-w4a4"], a3["fp4-minmax"], a3["fp4-rtn-plus-rotation"]
    pairs = [(hq, "fp32", "HQ-DiT vs FP32"), (rtn, "fp32", "round-to-nearest vs FP32"),
             (rot, "fp32", "rotation only vs FP32")]
    pairs += [(hq, w4a3_name(get_recipe(bit_recipe(m, "w4a4")).name), "HQ-DiT vs a baseline")
              for m in METHODS if m != "HQ-DiT"]
    pairs += [(hq, a3["hqdit-no-rotation"], "remove one: rotation"), (rot, rtn, "add one: rotation"),
              (rtn, a3["int4-rtn"], "FP vs INT")]
    return pd.DataFrame(pairs, columns=["A", "B", "group"])


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


# --------------------------------------------------------------------------------------------------
# chapter 7's rule: paired t-intervals, one primary metric
# --------------------------------------------------------------------------------------------------
def require_same_seeds(table: pd.DataFrame, recipes: Sequence[str] | None = None) -> list[int]:
    """The seeds every recipe of ``table`` (or of ``recipes``) ran — identical for all of them, each once —
    else ``ValueError`` naming the recipe whose seeds differ. Paired comparisons are valid only then."""
    recipes = list(dict.fromkeys(table["recipe"])) if recipes is None else list(recipes)
    seeds = None
    for r in recipes:
        s = table.loc[table["recipe"] == r, "seed"].tolist()
        if not s:
            raise ValueError(f"recipe {r!r} has no run in this table")
        if len(set(s)) != len(s):
            raise ValueError(f"recipe {r!r} ran a seed twice: {sorted(s)}")
        if seeds is None:
            seeds, first = sorted(s), r
        elif sorted(s) != seeds:
            raise ValueError(f"recipe {r!r} ran seeds {sorted(s)} but {first!r} ran {seeds}: rows are not paired")
    return seeds


def paired_differences(table: pd.DataFrame, a: str, b: str, metric: str) -> np.ndarray:
    """``metric(a) − metric(b)`` per seed both recipes ran (float64 ``[seeds]``, in seed order)."""
    x = table[table["recipe"] == a].set_index("seed")[metric]
    y = table[table["recipe"] == b].set_index("seed")[metric]
    common = x.index.intersection(y.index).sort_values()
    return (x.loc[common] - y.loc[common]).astype(float).to_numpy()


def paired_interval(table: pd.DataFrame, a: str, b: str, metric: str, level: float = LEVEL) -> dict:
    """Paired t-interval for the mean of ``metric(a) − metric(b)`` over the seeds both recipes ran.

    ``n`` paired differences give ``n − 1`` degrees of freedom; the interval is
    ``mean ± t_{(1+level)/2, n−1} · sd / √n`` with Student's t quantile for exactly those degrees of
    freedom (e.g. 12.71 for 1, 4.30 for 2, 2.78 for 4). ``direction``: ``"a better"`` / ``"b better"``
    when the whole interval lies on one side of zero (lower is better for FID-like metrics,
    :data:`LOWER_IS_BETTER`), ``"no difference detected"`` when it contains zero, ``None`` with one seed
    (no interval exists). A zero spread with a non-zero mean gives a zero-width interval.
    """
    from scipy import stats

    d = paired_difference(table, a, b, metric)
    diffs = paired_differences(table, a, b, metric)
    n, mean = len(diffs), float(diffs.mean())
    if n < 2 or not np.isfinite(diffs).all():
        lo = hi = t = float("nan")
        direction = None
    else:
        t = float(stats.t.ppf(0.5 + level / 2, df=n - 1))
        half = t * float(diffs.std(ddof=1)) / np.sqrt(n)
        lo, hi = mean - half, mean + half
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        glo, ghi = sorted((sign * lo, sign * hi))
        direction = "a better" if glo > 0 else "b better" if ghi < 0 else "no difference detected"
    return {"metric": metric, "a": a, "b": b, "difference": mean, "low": lo, "high": hi, "stderr": d["stderr"],
            "t": t, "df": n - 1, "seeds": n, "level": level, "direction": direction}


def _fmt(iv: dict, digits: int = 3) -> str:
    if not np.isfinite(iv["low"]):
        return f"{iv['difference']:+.{digits}g} (one seed: no interval)"
    return f"{iv['difference']:+.{digits}g} [{iv['low']:+.{digits}g}, {iv['high']:+.{digits}g}]"


def compare(table: pd.DataFrame, a: str, b: str, *, primary: str = PRIMARY,
            secondary: Sequence[str] = SECONDARY, level: float = LEVEL) -> dict:
    """Chapter 7's comparison of recipe ``a`` with recipe ``b`` (both on the same paired seeds).

    The ``primary`` metric's paired t-interval decides (``outcome``: ``"better"``, ``"worse"``, ``"no
    difference detected"``, or ``"cannot be judged"`` with one seed). Each secondary metric whose interval
    excludes zero on the same side as the primary outcome *agrees*, on the other side *contradicts*;
    when the primary detects no difference, the secondary metrics are counted by the side they detect.
    ``label`` says it in words, e.g. ``"better on sFID*: −0.26 [−0.35, −0.17]; 3 of 6 secondary metrics
    agree, 0 contradict"``.
    """
    require_same_seeds(table, [a, b])
    p = paired_interval(table, a, b, primary, level)
    sec = [paired_interval(table, a, b, m, level) for m in secondary if m in table.columns]
    outcome = {"a better": "better", "b better": "worse", "no difference detected": "no difference detected",
               None: "cannot be judged"}[p["direction"]]
    a_side = sum(s["direction"] == "a better" for s in sec)
    b_side = sum(s["direction"] == "b better" for s in sec)
    m = len(sec)
    if outcome == "better":
        agree, contra = a_side, b_side
        label = f"better on {primary}: {_fmt(p)}; {agree} of {m} secondary metrics agree, {contra} contradict"
    elif outcome == "worse":
        agree, contra = b_side, a_side
        label = f"worse on {primary}: {_fmt(p)}; {agree} of {m} secondary metrics agree, {contra} contradict"
    elif outcome == "no difference detected":
        agree = contra = 0
        label = (f"no {primary} difference detected: {_fmt(p)}; secondary metrics: {a_side} of {m} favour "
                 f"{a}, {b_side} favour {b}")
    else:
        agree = contra = 0
        label = f"cannot be judged (one seed): {primary} {_fmt(p)}"
    return {"a": a, "b": b, "outcome": outcome, "label": label, "primary": p,
            "interval": _fmt(p), "agree": agree, "contradict": contra, "secondary": m,
            "favour a": a_side, "favour b": b_side, "seeds": p["seeds"]}


def claim_verdict(table: pd.DataFrame, better: str, worse: str, **kwargs) -> dict:
    """The verdict on a claim "``better`` is better than ``worse``" by chapter 7's rule (:func:`compare`):
    ``"reproduced"`` when the primary metric's interval shows ``better`` ahead, ``"not reproduced"`` when
    it shows ``better`` behind, ``"inconclusive"`` when it contains zero, ``"cannot be judged"`` with one
    seed. Returns ``{"verdict", "evidence"}`` (the evidence is :func:`compare`'s label)."""
    c = compare(table, better, worse, **kwargs)
    verdict = {"better": "reproduced", "worse": "not reproduced", "no difference detected": "inconclusive",
               "cannot be judged": "cannot be judged"}[c["outcome"]]
    return {"verdict": verdict, "evidence": f"{better} − {worse}, {c['seeds']} paired seeds: {c['label']}"}


def compare_frame(table: pd.DataFrame, pairs: Sequence[tuple[str, str]], names: dict | None = None,
                  **kwargs) -> pd.DataFrame:
    """:func:`compare` for each ``(a, b)`` in ``pairs``: one row per pair with the primary metric's paired
    interval, the outcome, the secondary counts and the label (``names`` maps recipe names for display)."""
    names = names or {}
    rows = []
    for a, b in pairs:
        c = compare(table, a, b, **kwargs)
        p = c["primary"]
        rows.append({"A": names.get(a, a), "B": names.get(b, b),
                     f"{p['metric']}(A) − {p['metric']}(B)": p["difference"], "95 % low": p["low"],
                     "95 % high": p["high"], "outcome": c["outcome"],
                     "secondary agree": c["agree"], "secondary contradict": c["contradict"],
                     "label": c["label"]})
    return pd.DataFrame(rows)
