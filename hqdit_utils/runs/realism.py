"""How much like a trained transformer are a model's quantized weights? (the embedded model's check).

A weight matrix that never left its random initialisation looks like a random matrix: its largest
singular value sits at the Marchenko–Pastur edge ``σ·(√m + √n)`` and its entries are as flat as the
initial distribution (kurtosis 1.8 for uniform, 3 for normal). Training adds low-rank structure (a top
singular value well above the edge) and long tails (kurtosis above 3). :func:`weight_realism` measures
both per layer, plus how unequal the input channels and output rows are (the channel imbalance that
per-channel scales and rotations address).

Units: ratios are dimensionless; kurtosis is the plain fourth standardised moment (3 for a Gaussian).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..engine.layers import DEFAULT_LAYERS, layer_kind, select_linears

#: Thresholds the shipped embedded model must meet (medians over the quantized block linears).
MIN_MEDIAN_SV_RATIO = 2.0
MIN_ATTENTION_SV_RATIO = 1.5
MIN_MEDIAN_KURTOSIS = 3.0


@dataclass(frozen=True)
class WeightStats:
    """Statistics of one ``[out_features m, in_features n]`` weight matrix.

    sv_ratio: σ₁(W) / (std(W)·(√m + √n)) — 1.0 for an i.i.d. random matrix, larger when trained.
    kurtosis: E[(w−μ)⁴]/σ⁴ over all entries (uniform 1.8, Gaussian 3.0).
    row_spread / col_spread: largest ÷ median L2 norm of the output rows / input channels.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    sv_ratio: float
    kurtosis: float
    row_spread: float
    col_spread: float


def matrix_stats(name: str, kind: str, w: torch.Tensor) -> WeightStats:
    """:class:`WeightStats` of one weight ``w`` ``[m, n]`` (computed in float64)."""
    w = w.detach().to(torch.float64)
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    m, n = w.shape
    std = w.std(unbiased=False)
    top = torch.linalg.matrix_norm(w, ord=2)
    z = (w - w.mean()) / std
    rows, cols = w.norm(dim=1), w.norm(dim=0)
    return WeightStats(
        name=name, kind=kind, shape=(m, n),
        sv_ratio=float(top / (std * (m ** 0.5 + n ** 0.5))),
        kurtosis=float((z ** 4).mean()),
        row_spread=float(rows.max() / rows.median()),
        col_spread=float(cols.max() / cols.median()),
    )


def weight_realism(named_linears: dict[str, nn.Linear], kind_of) -> list[WeightStats]:
    """Per-layer :class:`WeightStats` of ``named_linears`` (name → ``nn.Linear``); ``kind_of(name)``
    gives the layer's kind (e.g. ``"to_q"``, ``"fc2"``) used to group attention projections."""
    return [matrix_stats(name, kind_of(name), lin.weight) for name, lin in named_linears.items()]


def model_realism(transformer: nn.Module) -> list[WeightStats]:
    """:func:`weight_realism` of the block linears the recipes quantize
    (:data:`~hqdit_utils.engine.layers.DEFAULT_LAYERS`: ``attn1.to_q/to_k/to_v/to_out.0``, ``ff.net.0.proj``,
    ``ff.net.2`` of every block — 36 layers in the embedded model), kinds from
    :func:`~hqdit_utils.engine.layers.layer_kind`."""
    return weight_realism(select_linears(transformer, DEFAULT_LAYERS), layer_kind)


def summarize_realism(stats: list[WeightStats]) -> dict:
    """Medians and extremes over ``stats``, and whether the embedded-model thresholds hold."""
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    sv = t([s.sv_ratio for s in stats])
    ku = t([s.kurtosis for s in stats])
    attn = t([s.sv_ratio for s in stats if s.kind in ("to_q", "to_k", "to_v", "to_out")])
    out = {
        "layers": len(stats),
        "median_sv_ratio": float(sv.median()),
        "min_attention_sv_ratio": float(attn.min()) if len(attn) else float("nan"),
        "median_kurtosis": float(ku.median()),
        "min_kurtosis": float(ku.min()),
        "max_kurtosis": float(ku.max()),
        "median_row_spread": float(t([s.row_spread for s in stats]).median()),
        "median_col_spread": float(t([s.col_spread for s in stats]).median()),
    }
    out["meets_thresholds"] = bool(
        out["median_sv_ratio"] >= MIN_MEDIAN_SV_RATIO
        and (not len(attn) or out["min_attention_sv_ratio"] >= MIN_ATTENTION_SV_RATIO)
        and out["median_kurtosis"] >= MIN_MEDIAN_KURTOSIS
    )
    return out


def as_rows(stats: list[WeightStats]) -> list[dict]:
    """``stats`` as plain dicts (one per layer), e.g. for ``pandas.DataFrame``."""
    return [asdict(s) for s in stats]


@dataclass(frozen=True)
class ActivationStats:
    """Outliers and time-dependence of one recorded layer input ``[rows, in_features]``.

    channel_spread: largest ÷ median per-channel max |x| over all recorded timesteps (a few outlier
        channels make it large; max/min would be driven by near-dead channels instead).
    timestep_range: largest ÷ smallest per-timestep max |x| (how far the range moves along sampling).
    top_channels: indices of the 4 channels with the largest max |x|.
    """

    name: str
    channel_spread: float
    timestep_range: float
    top_channels: tuple[int, ...]


def activation_realism(calibration, names) -> list[ActivationStats]:
    """:class:`ActivationStats` of the calibration records ``calibration[name]`` for ``names``."""
    out = []
    for name in names:
        rec = calibration[name]
        cmax = rec.pooled().channel_absmax.to(torch.float64)
        per_t = torch.tensor([rec.per_timestep[t].absmax for t in sorted(rec.per_timestep)], dtype=torch.float64)
        out.append(ActivationStats(
            name=name,
            channel_spread=float(cmax.max() / cmax.median()),
            timestep_range=float(per_t.max() / per_t.min()),
            top_channels=tuple(int(i) for i in torch.topk(cmax, min(4, len(cmax))).indices),
        ))
    return out
