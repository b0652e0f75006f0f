"""Significance, equivalence and power for paired comparisons over seeds: what a referee asks of a verdict.

Chapter 7 compares rows on paired seeds (:func:`~hqdit_utils.chapters.tables.paired_interval`). A 95 % interval per
comparison answers one question at a time; a page that asks two dozen needs three more things:

* :func:`holm` — Holm's step-down adjustment of p-values over a family declared before the data are read:
  the chance that *any* "difference detected" of the family is a false alarm stays ≤ α;
* :func:`tost` — two one-sided t-tests: is the mean difference inside ``(−margin, +margin)``? Only this can
  turn "no difference detected" into "equivalent"; the margin must be declared before the tables;
* :func:`mde` — the minimum detectable effect: the true difference a two-sided paired t-test at level α
  detects with the given power, from the paired standard deviation and the number of seeds. It says how
  large an effect an "inconclusive" fails to exclude;
* :func:`judge_family` — all of it for a family of (A, B) comparisons on one or more metrics, one row
  each, with a verdict: ``"A better"`` / ``"B better"`` (Holm-adjusted p < α), ``"equivalent"``
  (Holm-adjusted TOST p < α) or ``"inconclusive"``;
* :func:`declared_margins` — chapter 7's equivalence margins (our choice, stated before its tables);
* :func:`family_verdicts` — chapter 7's family on a run table: fidelity added, margins, verdicts (the
  chapter and the book's results page both call it);
* :func:`verdict_sentence` — one row of :func:`judge_family` in words;
* :func:`cross_cpu_check` — whether a verdict's interval clears zero by more than a rerun on another CPU
  was measured to move a row.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats

from .fidelity import FEATURE
from .tables import LEVEL, LOWER_IS_BETTER, PRIMARY, mean_std, paired_differences, paired_interval

__all__ = ["ALPHA", "POWER", "holm", "t_test", "tost", "mde", "judge_family", "declared_margins", "verdict_sentence",
           "cross_cpu_check", "family_verdicts", "joint_holm"]

#: Family-wise error rate of every family of comparisons.
ALPHA = 1 - LEVEL
#: Power at which the minimum detectable effect is stated.
POWER = 0.8


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values (same order as ``pvalues``): sort ascending, multiply the k-th smallest
    (k = 0, 1, …) by m − k, take the running maximum, cap at 1. NaN entries stay NaN and do not count in m."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    out[order] = np.minimum(adj, 1.0)
    return out


def _mean_se(d) -> tuple[np.ndarray, int, float, float]:
    d = np.asarray(d, dtype=float)
    n = len(d)
    if n < 2 or not np.isfinite(d).all():
        return d, n, float("nan"), float("nan")
    return d, n, float(d.mean()), float(d.std(ddof=1) / np.sqrt(n))


def t_test(d: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test "mean of the differences ``d`` [n] is 0" (n − 1 df).
    NaN with fewer than 2 differences; with zero spread 0 (non-zero mean) or 1 (all zero)."""
    d, n, mean, se = _mean_se(d)
    if not np.isfinite(se):
        return float("nan")
    if se == 0:
        return 0.0 if mean != 0 else 1.0
    return float(2 * stats.t.sf(abs(mean) / se, n - 1))


def tost(d: Sequence[float], margin: float) -> dict:
    """Two one-sided t-tests for equivalence of the paired differences ``d`` [n] within ``±margin``.

    H0₁: mean ≤ −margin (p_lower = P(T ≥ (mean + margin)/se)), H0₂: mean ≥ +margin (p_upper = P(T ≤ (mean
    − margin)/se)), T ~ t(n − 1). Equivalence at level α when ``p = max(p_lower, p_upper) < α`` — the same
    as the (1 − 2α) t-interval lying inside the margins. Returns ``{"p", "p_lower", "p_upper", "margin"}``;
    the p-values are NaN with fewer than 2 differences or a NaN margin (e.g. estimated from one seed).
    """
    if margin <= 0:
        raise ValueError(f"an equivalence margin must be positive; got {margin}")
    d, n, mean, se = _mean_se(d)
    if not (np.isfinite(se) and np.isfinite(margin)):  # one seed, or a margin that could not be estimated
        p_lo = p_hi = float("nan")
    elif se == 0:
        p_lo, p_hi = float(mean <= -margin), float(mean >= margin)
    else:
        p_lo = float(stats.t.sf((mean + margin) / se, n - 1))
        p_hi = float(stats.t.cdf((mean - margin) / se, n - 1))
    return {"p": max(p_lo, p_hi), "p_lower": p_lo, "p_upper": p_hi, "margin": float(margin)}


def _power(effect: float, sd: float, n: int, alpha: float) -> float:
    """Power of the two-sided one-sample t-test at level ``alpha`` when the true mean is ``effect``."""
    df, nc = n - 1, effect / (sd / np.sqrt(n))
    crit = stats.t.ppf(1 - alpha / 2, df)
    far = stats.nct.cdf(-crit, df, nc)  # the wrong-side tail: negligible, and NaN in scipy for a large nc
    return float(stats.nct.sf(crit, df, nc) + (0.0 if np.isnan(far) else far))


def mde(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable effect of a two-sided paired t-test: the true mean difference detected with
    probability ``power`` at level ``alpha`` by ``n`` paired differences of standard deviation ``sd``
    (exact, from the non-central t distribution; in the units of the differences). NaN for n < 2;
    0 for sd = 0."""
    if n < 2 or not np.isfinite(sd):
        return float("nan")
    if sd == 0:
        return 0.0
    if not 0 < alpha < 1 or not alpha < power < 1:
        raise ValueError(f"need 0 < alpha < power < 1; got alpha={alpha}, power={power}")
    hi = 1.0  # in units of sd
    while _power(hi, 1.0, n, alpha) < power:
        hi *= 2
    return sd * float(optimize.brentq(lambda e: _power(e, 1.0, n, alpha) - power, 0.0, hi, xtol=1e-12))


def _verdict(r, alpha: float) -> str:
    if not np.isfinite(r.p_holm):
        return "cannot be judged"
    if r.p_holm < alpha:
        a_ahead = r.difference < 0 if r.metric in LOWER_IS_BETTER else r.difference > 0
        return "A better" if a_ahead else "B better"
    return "equivalent" if r.p_tost_holm < alpha else "inconclusive"


def judge_family(table: pd.DataFrame, pairs: Sequence[tuple[str, str]], margins: Mapping[str, float], *,
                 alpha: float = ALPHA, power: float = POWER) -> pd.DataFrame:
    """Every (A, B) of ``pairs`` on every metric of ``margins`` (metric → equivalence margin, declared
    before the data): one family, Holm-adjusted over all ``len(pairs) · len(margins)`` tests.

    Columns: ``A``, ``B``, ``metric``, ``difference`` (mean of A − B over the paired seeds), ``low``,
    ``high`` (the (1 − α) t-interval), ``seeds``, ``sd`` (of the paired differences), ``p`` and ``p_holm``
    (t-test), ``margin``, ``p_tost`` and ``p_tost_holm``, ``mde`` (at α, ``power``), and ``verdict``:
    ``"A better"`` / ``"B better"`` when ``p_holm < alpha`` (direction by :data:`LOWER_IS_BETTER`),
    else ``"equivalent"`` when ``p_tost_holm < alpha``, else ``"inconclusive"`` (``"cannot be judged"``
    with one seed).
    """
    rows = []
    for metric, margin in margins.items():
        for a, b in pairs:
            d = paired_differences(table, a, b, metric)
            iv = paired_interval(table, a, b, metric, level=1 - alpha)
            sd = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
            rows.append({"A": a, "B": b, "metric": metric, "difference": iv["difference"], "low": iv["low"],
                         "high": iv["high"], "seeds": len(d), "sd": sd, "p": t_test(d), "margin": float(margin),
                         "p_tost": tost(d, margin)["p"], "mde": mde(sd, len(d), alpha, power)})
    out = pd.DataFrame(rows)
    out["p_holm"] = holm(out["p"])
    out["p_tost_holm"] = holm(out["p_tost"])
    out["verdict"] = [_verdict(r, alpha) for r in out.itertuples()]
    cols = ["A", "B", "metric", "difference", "low", "high", "seeds", "sd", "p", "p_holm", "margin", "p_tost",
            "p_tost_holm", "mde", "verdict"]
    return out[cols]


def declared_margins(table: pd.DataFrame, *, reference: str = "fp32", floor: str = "hqdit-w8a8") -> dict[str, float]:
    """Chapter 7's equivalence margins (our choice), from rows that define a scale rather than a claim:

    * sFID*: one seed-to-seed standard deviation of ``reference``'s sFID* (a difference smaller than what
      changing FP32's seed does is treated as negligible);
    * feature distance to FP32: ``floor``'s mean distance to FP32 (a change in distance smaller than the
      whole distance of the 8-bit HQ-DiT from FP32 is treated as negligible).
    """
    mean, std = mean_std(table[table["recipe"].isin([reference, floor])], [PRIMARY, FEATURE])
    return {PRIMARY: float(std.loc[reference, PRIMARY]), FEATURE: float(mean.loc[floor, FEATURE])}


def _iv(r, digits: int) -> str:
    return f"{r.difference:+.{digits}g} [{r.low:+.{digits}g}, {r.high:+.{digits}g}]"


def verdict_sentence(r, names: Mapping[str, str] | None = None, digits: int = 3) -> str:
    """One row ``r`` of :func:`judge_family` (a namedtuple or Series) in words, with its interval, its
    Holm-adjusted p and — for "inconclusive" — the minimum detectable effect and the margin not shown."""
    if isinstance(r, pd.Series):
        r = pd.DataFrame([r]).itertuples().__next__()
    names = names or {}
    a, b, m = names.get(r.A, r.A), names.get(r.B, r.B), r.metric
    lvl = f"{1 - ALPHA:.0%}"
    if r.verdict in ("A better", "B better"):
        win, lose = (a, b) if r.verdict == "A better" else (b, a)
        return (f"{win} is better than {lose} on {m} (A − B = {_iv(r, digits)}, {lvl} interval over {r.seeds} "
                f"paired seeds; Holm-adjusted p = {r.p_holm:.2g})")
    if r.verdict == "equivalent":
        return (f"{a} and {b} are equivalent on {m} within ±{r.margin:.{digits}g} (A − B = {_iv(r, digits)}; "
                f"two one-sided tests, Holm-adjusted p = {r.p_tost_holm:.2g})")
    if r.verdict == "cannot be judged":
        return f"{a} against {b} on {m} cannot be judged with one seed"
    return (f"no {m} difference between {a} and {b} is detected (A − B = {_iv(r, digits)}; Holm-adjusted "
            f"p = {r.p_holm:.2g}); these {r.seeds} seeds would detect a true difference of {r.mde:.{digits}g} "
            f"with {POWER:.0%} power, and equivalence within ±{r.margin:.{digits}g} is not shown")


def cross_cpu_check(family: pd.DataFrame, shift: float, metric: str = PRIMARY,
                    unchanged: Sequence[str] = ("fp32",)) -> pd.DataFrame:
    """For each ``metric`` row of ``family`` (:func:`judge_family`): could a rerun on another CPU move it
    across zero? A quantized row's metric is taken to move by up to ``shift`` (a measured size, not a
    bound), a row in ``unchanged`` (bit-identical across CPUs) not at all, so A − B moves by up to
    ``tolerance`` = ``shift`` × (number of quantized rows among A and B); 0 when A and B score identically on
    every seed (the same model under two names moves as one). ``clearance``: how far the
    interval stays from zero (negative when it contains zero); ``robust``: |clearance| > tolerance, i.e. the
    interval's relation to zero (excluding it or containing it) survives such a move. The interval is the
    per-comparison one of ``family`` (``low``, ``high``)."""
    f = family[family["metric"] == metric].copy()
    f["tolerance"] = shift * ((~f["A"].isin(unchanged)).astype(int) + (~f["B"].isin(unchanged)).astype(int))
    f.loc[(f["low"] == 0) & (f["high"] == 0), "tolerance"] = 0.0  # identical on every seed: the same model twice
    f["clearance"] = np.where(f["low"] > 0, f["low"], np.where(f["high"] < 0, -f["high"],
                                                                -np.minimum(-f["low"], f["high"])))
    f["robust"] = (f["clearance"].abs() > f["tolerance"]) | (f["tolerance"] == 0)
    return f[["A", "B", "verdict", "low", "high", "tolerance", "clearance", "robust"]]


def family_verdicts(bundle, table: pd.DataFrame, family: pd.DataFrame | None = None,
                    margins: Mapping[str, float] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """Chapter 7's verdicts on a :func:`~hqdit_utils.runs.experiments.run_table` frame of a family's rows (every
    row on the same paired seeds, FP32 among them).

    Args:
        family: the comparisons (``A``, ``B``, ``group``); default
            :func:`~hqdit_utils.chapters.tables.chapter7_family` (the W4A4 table's).
        margins: metric → equivalence margin; default :func:`declared_margins` of ``table`` (which then needs
            the rows that define them).

    Returns ``(table, family, margins)``: the table with the fidelity columns added
    (:func:`~hqdit_utils.chapters.fidelity.with_fidelity`), :func:`judge_family` over the family on every metric
    of the margins (with a ``group`` column), and the margins.
    """
    from .fidelity import with_fidelity
    from .tables import chapter7_family

    table = with_fidelity(bundle, table)
    margins = dict(margins) if margins is not None else declared_margins(table)
    fam = chapter7_family() if family is None else family
    judged = judge_family(table, list(zip(fam["A"], fam["B"])), margins)
    judged["group"] = list(fam["group"]) * len(margins)
    return table, judged, margins


def joint_holm(*families: pd.DataFrame, alpha: float = ALPHA) -> list[pd.DataFrame]:
    """The families of :func:`judge_family` re-judged as one: Holm over all their tests together (stricter than
    each family on its own). Returns copies with ``p_holm``, ``p_tost_holm`` and ``verdict`` recomputed."""
    both = pd.concat(families, keys=range(len(families)))
    both["p_holm"] = holm(both["p"])
    both["p_tost_holm"] = holm(both["p_tost"])
    both["verdict"] = [_verdict(r, alpha) for r in both.itertuples()]
    return [both.xs(i).reset_index(drop=True) for i in range(len(families))]
