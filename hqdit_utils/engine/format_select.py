"""Per-layer FP format selection — the "hybrid" of HQ-DiT.

What the paper does, as far as known (a third-party summary; book/choices.md#choices-format-selection):
the FP4 format of each layer is chosen among E3M0 / E2M1 / E1M2 from a distribution statistic of the
**weights**, a max/min ratio the summary calls ``s_w``; its exact definition and thresholds are UNKNOWN.

What this module does:

* **One format choice** — :func:`choose_format`, used by :func:`~hqdit_utils.engine.qmodel.quantize_` for weights
  and activations and (through :func:`select_format`) by chapter 3. Its default rule (ours, ``"mse"``):
  for each candidate format, run the clipping search (:mod:`.clipping`) and keep the format with the
  lowest calibration MSE *after* clipping; done separately for the weight (per-channel α) and for the
  activation (per-tensor or per-token α), so a layer's weight and activation may get different formats.
  By construction the choice is never worse in MSE than any fixed candidate. The other rules:
  ``"output"`` (layer-output error, the FPQ baseline) and ``"ratio"`` (below).
* **The paper-style statistics** — :func:`ratio_statistics` computes three plausible readings of the
  summary's ``s_w``: ``max_min_ratio`` (reading 1: max|t| / min non-zero |t|), ``channel_max_ratio``
  (reading 2: largest / smallest per-channel max-abs), ``max_rms_ratio`` (reading 3 with the RMS as the
  "typical magnitude": the crest factor); plus ``max_mean_ratio`` and the kurtosis.
* **A threshold rule** — :func:`ratio_rule`: statistic < t₁ → the format with the fewest exponent bits,
  < t₂ → the middle one, else the most exponent bits (more range for heavier tails). The default
  thresholds in :data:`DEFAULT_THRESHOLDS` are OUR guesses; :func:`fit_thresholds` finds the thresholds
  that agree best with the MSE choice, so the book can say how well *any* rule of this shape can do.

The result is a :class:`FormatPlan` (layer → weight format, activation format, MSE per candidate,
statistics) that round-trips through JSON.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch

from .clipping import ClipResult, clip_activation, clip_weight
from .formats import FloatFormat, parse_format
from .stats import hist_bin_edges

__all__ = ["DEFAULT_CANDIDATES", "STATISTICS", "DEFAULT_THRESHOLDS", "RULES", "FormatChoice", "LayerFormat",
           "FormatPlan", "choose_format", "select_format", "ratio_statistics", "ratio_statistics_from_stats",
           "ratio_rule", "fit_thresholds", "order_by_range"]

#: The FP4 candidates of the paper (E1M2, E2M1, E3M0; book/choices.md#choices-formats).
DEFAULT_CANDIDATES: tuple[str, ...] = ("fp4_e1m2", "fp4_e2m1", "fp4_e3m0")
#: Names of the paper-style statistics (three readings of the summary's ``s_w``, plus two extras).
STATISTICS = ("max_min_ratio", "channel_max_ratio", "max_rms_ratio", "max_mean_ratio", "kurtosis")
#: Our default thresholds (t₁, t₂) per statistic — guesses, NOT the paper's (unknown); see fit_thresholds.
DEFAULT_THRESHOLDS: dict[str, tuple[float, float]] = {
    "max_min_ratio": (1e4, 1e6),
    "channel_max_ratio": (4.0, 16.0),
    "max_rms_ratio": (6.0, 12.0),
    "max_mean_ratio": (8.0, 16.0),
    "kurtosis": (6.0, 20.0),
}


def order_by_range(formats: Sequence[str]) -> list[str]:
    """Formats sorted from the least to the most exponent bits (INT counts as 0 exponent bits)."""
    def key(name):
        f = parse_format(name)
        return (f.exp_bits if isinstance(f, FloatFormat) else 0, str(f))
    return sorted(formats, key=key)


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------
def ratio_statistics(t: torch.Tensor, channel_axis: int = 0) -> dict[str, float]:
    """The paper-style distribution statistics of a tensor.

    Args:
        t: a weight [out, in] (``channel_axis=0``: per output channel) or activation rows [n, d]
            (``channel_axis=1``: per input channel).
    Returns:
        ``{name: value}`` for every name in :data:`STATISTICS` (NaN where undefined, e.g. all zeros).
    """
    a = t.detach().abs().to(torch.float64)
    nz = a[a > 0]
    if nz.numel() == 0:
        return {k: float("nan") for k in STATISTICS}
    amax = float(nz.max())
    dims = [d for d in range(a.dim()) if d != channel_axis % a.dim()]
    cmax = a.amax(dim=dims) if dims else a
    cpos = cmax[cmax > 0]
    x = t.detach().to(torch.float64)
    mu, var = float(x.mean()), float(x.var(unbiased=False))
    kurt = float(((x - mu) ** 4).mean() / var ** 2) if var > 0 else float("nan")
    return {
        "max_min_ratio": amax / float(nz.min()),
        "channel_max_ratio": float(cpos.max() / cpos.min()),
        "max_rms_ratio": amax / float(a.pow(2).mean().sqrt()),
        "max_mean_ratio": amax / float(a.mean()),
        "kurtosis": kurt,
    }


def ratio_statistics_from_stats(st) -> dict[str, float]:
    """The same statistics from a :class:`~hqdit_utils.engine.stats.TensorStats` (whole calibration set).

    ``max_min_ratio`` uses the lower edge of the lowest non-empty histogram bin above zero (exact to 1/8
    octave); ``max_mean_ratio`` is not available from the running sums and uses the histogram.
    """
    edges = hist_bin_edges()
    h = st.hist.clone()
    h[0] = 0  # bin 0 holds zeros and tiny denormals
    nzb = torch.nonzero(h)
    cmax = st.channel_absmax
    cpos = cmax[cmax > 0]
    if st.absmax == 0 or nzb.numel() == 0:
        return {k: float("nan") for k in STATISTICS}
    mid = ((edges[:-1] + edges[1:]) / 2).clamp(max=st.absmax)
    mean_abs = float((h.double() * mid).sum() / max(st.numel, 1))
    rms = math.sqrt(float(st.moments[1]) / max(st.numel, 1))
    return {
        "max_min_ratio": st.absmax / float(edges[int(nzb[0])]),
        "channel_max_ratio": float(cpos.max() / cpos.min()),
        "max_rms_ratio": st.absmax / rms if rms > 0 else float("nan"),
        "max_mean_ratio": st.absmax / mean_abs if mean_abs > 0 else float("nan"),
        "kurtosis": st.kurtosis,
    }


def ratio_rule(value: float, thresholds: tuple[float, float], formats: Sequence[str] = DEFAULT_CANDIDATES) -> str:
    """The threshold rule: ``value < t₁`` → fewest exponent bits, ``< t₂`` → middle, else most.

    With other than three formats, ``thresholds`` must hold ``len(formats) - 1`` increasing values.
    """
    fs = order_by_range(formats)
    if len(thresholds) != len(fs) - 1:
        raise ValueError(f"need {len(fs) - 1} thresholds for {len(fs)} formats, got {thresholds}")
    for f, t in zip(fs, thresholds):
        if value < t:
            return f
    return fs[-1]


def fit_thresholds(values: Sequence[float], choices: Sequence[str], formats: Sequence[str] = DEFAULT_CANDIDATES
                   ) -> tuple[tuple[float, ...], float]:
    """Thresholds maximising the agreement of :func:`ratio_rule` with given choices (exhaustive search).

    Args:
        values: the statistic, one per tensor. choices: the MSE-optimal format of each tensor.
    Returns:
        (thresholds, agreement fraction). Candidate thresholds are midpoints between sorted values
        (plus ±inf), so the search is exact; O(n^k) for k thresholds — fine for a few hundred layers.
    """
    fs = order_by_range(formats)
    v = [float(x) for x in values]
    if not v:
        raise ValueError("fit_thresholds: no values")
    sv = sorted(set(x for x in v if math.isfinite(x)))
    cuts = [-math.inf] + [(a + b) / 2 for a, b in zip(sv, sv[1:])] + [math.inf]
    best, best_acc = tuple([math.inf] * (len(fs) - 1)), -1.0
    for th in itertools.combinations_with_replacement(cuts, len(fs) - 1):
        acc = sum(ratio_rule(x, th, fs) == c for x, c in zip(v, choices)) / len(v)
        if acc > best_acc + 1e-12:
            best, best_acc = th, acc
    return tuple(best), best_acc


# --------------------------------------------------------------------------------------------------
# The format choice
# --------------------------------------------------------------------------------------------------
#: The rules of :func:`choose_format`.
RULES = ("mse", "output", "ratio")


@dataclass
class FormatChoice:
    """Outcome of :func:`choose_format` for one tensor: the chosen format, its clip result (``None`` when
    the rule did not search, i.e. the ratio rule), and the clip result and calibration MSE (per element,
    after clipping) of every candidate that was searched."""

    format: str
    clip: ClipResult | None
    mse: dict[str, float]
    clips: dict[str, ClipResult]


def choose_format(candidates: Sequence[str], clip: Callable[[str], ClipResult], *, rule: str = "mse",
                  stats: dict[str, float] | None = None, statistic: str = "channel_max_ratio",
                  thresholds: Sequence[float] | None = None) -> FormatChoice:
    """Choose one format among ``candidates`` for one tensor — the one format choice of the package.

    Rules (book/choices.md#choices-format-selection):

    * ``"mse"`` (our default): run ``clip(name)`` — the clipping search in format ``name`` — for every
      candidate and keep the lowest MSE after clipping;
    * ``"output"`` (the FPQ baseline): the same searches with a layer-output loss; keep the lowest loss
      (summed over channels);
    * ``"ratio"`` (the paper-style rule): :func:`ratio_rule` on ``stats[statistic]`` with ``thresholds``
      (default :data:`DEFAULT_THRESHOLDS`); no search is run.

    Args:
        candidates: format names, e.g. :data:`DEFAULT_CANDIDATES`.
        clip: ``name -> ClipResult``, the clipping search of the tensor in that format.
        stats: :func:`ratio_statistics` of the tensor (ratio rule only).
    Returns:
        :class:`FormatChoice`. Ties keep the earlier candidate.
    """
    if not candidates:
        raise ValueError("choose_format: empty candidate list")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "ratio":
        if stats is None:
            raise ValueError("the ratio rule needs the tensor's statistics (stats=ratio_statistics(t))")
        th = thresholds or DEFAULT_THRESHOLDS[statistic]
        return FormatChoice(ratio_rule(stats[statistic], th, list(candidates)), None, {}, {})
    clips = {name: clip(name) for name in candidates}
    mse = {name: c.mse for name, c in clips.items()}
    score = mse if rule == "mse" else {name: float(c.loss.sum()) for name, c in clips.items()}
    best = min(candidates, key=lambda name: score[name])
    return FormatChoice(best, clips[best], mse, clips)


def select_format(t: torch.Tensor, candidates: Sequence[str] = DEFAULT_CANDIDATES, *, kind: str = "weight",
                  granularity: str | None = None, clip_method: str = "mse", grid: torch.Tensor | None = None,
                  p: float = 2.4, rule: str = "mse", **clip_kwargs) -> FormatChoice:
    """:func:`choose_format` of a tensor ``t`` with the clipping search bound to it.

    Args:
        t: weight [out, in] (``kind="weight"``, per-channel α) or activation rows [n, d]
            (``kind="activation"``, ``granularity`` "tensor" or "token").
        candidates: format names.
        clip_method, grid, p, clip_kwargs: passed to :func:`~hqdit_utils.engine.clipping.clip_weight` /
            :func:`~hqdit_utils.engine.clipping.clip_activation`.
        rule: "mse", "output" or "ratio" (the ratio rule reads :func:`ratio_statistics` of ``t``).
    """
    if kind == "weight":
        def clip(name):
            return clip_weight(t, name, method=clip_method, grid=grid, p=p, **clip_kwargs)
    elif kind == "activation":
        def clip(name):
            return clip_activation(t, name, granularity=granularity or "tensor", method=clip_method, grid=grid,
                                   p=p, **clip_kwargs)
    else:
        raise ValueError(f"kind must be 'weight' or 'activation', got {kind!r}")
    stats = ratio_statistics(t, channel_axis=0 if kind == "weight" else 1) if rule == "ratio" else None
    return choose_format(candidates, clip, rule=rule, stats=stats)


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------
@dataclass
class LayerFormat:
    """Formats of one layer. ``*_mse``: per-element calibration MSE of each candidate after clipping;
    ``*_stats``: the :data:`STATISTICS` of the (rotated, if rotation is on) tensor; ``*_gamma``: the
    chosen clip ratio (mean over channels for the weight)."""

    weight_format: str
    act_format: str
    weight_mse: dict[str, float] = field(default_factory=dict)
    act_mse: dict[str, float] = field(default_factory=dict)
    weight_stats: dict[str, float] = field(default_factory=dict)
    act_stats: dict[str, float] = field(default_factory=dict)
    weight_gamma: float = 1.0
    act_gamma: float = 1.0


@dataclass
class FormatPlan:
    """Layer name → :class:`LayerFormat`, plus the candidate list and free-form metadata."""

    layers: dict[str, LayerFormat] = field(default_factory=dict)
    candidates: list[str] = field(default_factory=lambda: list(DEFAULT_CANDIDATES))
    meta: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerFormat:
        return self.layers[name]

    def to_json(self) -> str:
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v
        return json.dumps(clean({"candidates": self.candidates, "meta": self.meta,
                                 "layers": {k: asdict(v) for k, v in self.layers.items()}}), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "FormatPlan":
        def unclean(v):
            if isinstance(v, str) and v in ("nan", "inf", "-inf"):
                return float(v)
            if isinstance(v, dict):
                return {k: unclean(x) for k, x in v.items()}
            return v
        blob = json.loads(text)
        layers = {k: LayerFormat(**unclean(v)) for k, v in blob["layers"].items()}
        return cls(layers, list(blob["candidates"]), blob.get("meta", {}))

    def save(self, path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path) -> "FormatPlan":
        return cls.from_json(Path(path).read_text())

    def histogram(self, kind: str = "weight") -> dict[str, int]:
        """How many layers use each format (``kind``: "weight" or "act")."""
        out: dict[str, int] = {}
        for lf in self.layers.values():
            f = lf.weight_format if kind == "weight" else lf.act_format
            out[f] = out.get(f, 0) + 1
        return out

    def agreement(self, kind: str = "weight", statistic: str = "channel_max_ratio",
                  thresholds: Sequence[float] | None = None) -> float:
        """Fraction of layers where :func:`ratio_rule` on ``statistic`` picks the plan's format
        (thresholds default to :data:`DEFAULT_THRESHOLDS`; only layers whose stats are present)."""
        th = tuple(thresholds) if thresholds is not None else DEFAULT_THRESHOLDS[statistic]
        hits = total = 0
        for lf in self.layers.values():
            stats = lf.weight_stats if kind == "weight" else lf.act_stats
            choice = lf.weight_format if kind == "weight" else lf.act_format
            if statistic not in stats or choice not in self.candidates:
                continue
            total += 1
            hits += ratio_rule(stats[statistic], th, self.candidates) == choice
        return hits / total if total else float("nan")

    def fit(self, kind: str = "weight", statistic: str = "channel_max_ratio") -> tuple[tuple[float, ...], float]:
        """:func:`fit_thresholds` of ``statistic`` against the plan's choices."""
        vals, ch = [], []
        for lf in self.layers.values():
            stats = lf.weight_stats if kind == "weight" else lf.act_stats
            choice = lf.weight_format if kind == "weight" else lf.act_format
            if statistic in stats and choice in self.candidates:
                vals.append(stats[statistic])
                ch.append(choice)
        return fit_thresholds(vals, ch, self.candidates)

    def to_pandas(self):
        rows = []
        for name, lf in self.layers.items():
            row = {"layer": name, "weight_format": lf.weight_format, "act_format": lf.act_format,
                   "weight_gamma": lf.weight_gamma, "act_gamma": lf.act_gamma}
            row.update({f"w_mse[{k}]": v for k, v in lf.weight_mse.items()})
            row.update({f"a_mse[{k}]": v for k, v in lf.act_mse.items()})
            row.update({f"w_{k}": v for k, v in lf.weight_stats.items()})
            row.update({f"a_{k}": v for k, v in lf.act_stats.items()})
            rows.append(row)
        return pd.DataFrame(rows)
