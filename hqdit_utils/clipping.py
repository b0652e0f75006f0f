"""Clipping-range search: choose the largest representable magnitude α of a quantization grid.

α, scale and exponent bias
--------------------------
For a format ``fmt`` with largest value ``fmt.max_value`` (integer default bias β₀), clipping at α means
using the scale ``s = α / fmt.max_value`` in :func:`~hqdit_utils.quantizer.fake_quantize`:
``x_q = round_to_grid(x / s) · s``; values beyond ±α saturate. For an ExMy format the same grid is the
format with the real-valued exponent bias ``β(α) = 2^E − 1 − log2 α + log2(2 − 2^−M)``
(:func:`alpha_to_bias`, from :func:`~hqdit_utils.formats.bias_for_clip`). So "clipping-range selection"
(the paper's term, digest §3.4) = "bias selection" = "scale selection"; this module searches α.

The search (digest §9.6 — our default, the paper's criterion is unknown)
-------------------------------------------------------------------------
α = γ · max|x| for γ on a grid (default 100 points in [0.3, 1.0], :func:`gamma_grid`; γ = 1 is max-abs,
i.e. no clipping), keeping the γ with the smallest loss:

* ``"mse"``   — Σ (x − Q(x))²;
* ``"lp"``    — Σ |x − Q(x)|^p (``p`` given; p = 2.4 is a common choice in the PTQ literature);
* ``"output"`` — the layer-output error ‖X Wᵀ − Q(X) Q(W)ᵀ‖² on calibration rows ``X`` (for a weight:
  per output channel, with the other side given; for an activation: with the quantized weight given);
* ``"none"``  — γ = 1.

Granularity: per output channel for weights (``[out, in]``, one α per row), per tensor (static, one α)
or per token (dynamic: the searched quantity is a single γ, applied at run time as α_t = γ·max|x_t|) for
activations. Everything is vectorised over channels *and* grid points; the only Python loop is over
chunks that bound the temporary memory (``max_elems`` elements per chunk). Because γ = 1 is always on
the grid, the searched loss is never worse than max-abs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import FloatFormat, Format, NoFormat, bias_for_clip, parse_format
from .quantizer import round_to_grid

__all__ = ["ClipResult", "gamma_grid", "clip_weight", "clip_activation", "alpha_to_scale", "alpha_to_bias",
           "CLIP_METHODS", "SEARCHES"]

CLIP_METHODS = ("none", "mse", "lp", "output")
_MAX_ELEMS = 1 << 20  # temporaries of at most 1 M float32 elements (4 MB, cache-sized) per chunk


def gamma_grid(n: int = 100, lo: float = 0.3, hi: float = 1.0) -> torch.Tensor:
    """``n`` ratios γ = α / max|x|, evenly spaced in [lo, hi] (float32 [n]); ``hi`` should be 1."""
    if n < 1 or not 0 < lo <= hi:
        raise ValueError(f"gamma_grid needs n >= 1 and 0 < lo <= hi, got n={n}, lo={lo}, hi={hi}")
    return torch.linspace(lo, hi, n, dtype=torch.float32) if n > 1 else torch.tensor([hi], dtype=torch.float32)


def alpha_to_scale(alpha: "torch.Tensor | float", fmt: "str | Format") -> torch.Tensor:
    """The ``fake_quantize`` scale ``α / fmt.max_value`` (all-zero channels: scale 1)."""
    fmt = parse_format(fmt)
    a = torch.as_tensor(alpha, dtype=torch.float32)
    if isinstance(fmt, NoFormat):
        return torch.ones_like(a)
    return torch.where(a > 0, a / fmt.max_value, torch.ones_like(a))


def alpha_to_bias(alpha: float, fmt: "str | FloatFormat") -> float:
    """The real-valued exponent bias β whose grid has largest value ``alpha`` (see module docstring)."""
    fmt = parse_format(fmt)
    if not isinstance(fmt, FloatFormat):
        raise ValueError(f"alpha_to_bias needs a float format, got {fmt}")
    return bias_for_clip(fmt, float(alpha))


@dataclass
class ClipResult:
    """Outcome of a clipping search.

    Attributes:
        alpha: chosen clip value(s): [C] per channel, 0-d per tensor; for per-token (dynamic) it is the
            *calibration-set* max·γ (informative only — at run time α_t = γ·max|x_t|).
        gamma: chosen γ, same shape as ``alpha`` (0-d for tensor/token).
        loss: loss at the chosen γ (same shape), in the units of ``method``.
        loss_at_max: loss at γ = 1 (max-abs), same shape.
        mse: mean squared error per element at the chosen γ (float) — comparable across formats.
        granularity: "channel" | "tensor" | "token".
        method: the loss used.
    """

    alpha: torch.Tensor
    gamma: torch.Tensor
    loss: torch.Tensor
    loss_at_max: torch.Tensor
    mse: float
    granularity: str
    method: str

    def scale(self, fmt: "str | Format") -> torch.Tensor:
        """Scales for ``fake_quantize``: [C, 1] per channel, 0-d per tensor (not for per-token)."""
        s = alpha_to_scale(self.alpha, fmt)
        return s[:, None] if self.granularity == "channel" else s


def _check(method: str, p: float) -> None:
    if method not in CLIP_METHODS:
        raise ValueError(f"unknown clipping method {method!r}; choose one of {CLIP_METHODS}")
    if method == "lp" and not p > 0:
        raise ValueError(f"L_p clipping needs p > 0, got {p}")


def _elem_loss(err: torch.Tensor, method: str, p: float) -> torch.Tensor:
    if method == "lp":
        return err.abs().pow(p)
    return err * err


def _fq(x: torch.Tensor, s: torch.Tensor, fmt: Format) -> torch.Tensor:
    return round_to_grid(x / s, fmt) * s


def _scaled_loss(x: torch.Tensor, s: torch.Tensor, fmt: Format, method: str, p: float, dims) -> torch.Tensor:
    """Σ loss(Q(x) − x) over ``dims``, computed in the scaled domain: with t = x / s,
    Q(x) − x = (round(t) − t)·s, so the loss is s²·Σ(round(t) − t)² (MSE) or s^p·Σ|round(t) − t|^p.
    ``s`` must be constant along ``dims``. One division, the rounding and three passes per element."""
    t = x / s
    e = round_to_grid(t, fmt).sub_(t)
    if method == "lp":
        return e.abs_().pow_(p).sum(dim=dims, keepdim=True) * s.pow(p)
    return e.mul_(e).sum(dim=dims, keepdim=True) * (s * s)


SEARCHES = ("grid", "coarse-fine")


def _search(eval_fn, g: torch.Tensor, C: int, search: str, stride: int):
    """Minimise ``eval_fn(gammas [C, k]) -> losses [C, k]`` over the grid ``g`` for each of C rows.

    ``"grid"``: every grid point. ``"coarse-fine"``: every ``stride``-th point (always including γ = 1),
    then the ``2·stride − 1`` points around each row's coarse minimum — ~3x fewer evaluations for the
    default 100-point grid and the same answer whenever the loss is unimodal within ``stride`` points;
    γ = 1 is always evaluated, so never worse than max-abs. Ties go to the smaller γ.
    Returns (best index [C], best loss [C], loss at γ = 1 [C]).
    """
    G = len(g)
    one = int(torch.argmin((g - 1).abs()))
    if search not in SEARCHES:
        raise ValueError(f"unknown clip search {search!r}; choose one of {SEARCHES}")
    if search == "grid" or G <= 3 * stride:
        L = eval_fn(g[None, :].expand(C, G))
        best = torch.argmin(L, dim=1)  # first minimum: the smaller γ
        return best, L.gather(1, best[:, None])[:, 0], L[:, one]
    coarse = sorted(set(range(one, -1, -stride)) | set(range(one, G, stride)))
    ci = torch.tensor(coarse)
    Lc = eval_fn(g[ci][None, :].expand(C, len(coarse)))
    bc = ci[torch.argmin(Lc, dim=1)]
    fi = (bc[:, None] + torch.arange(-stride + 1, stride)[None, :]).clamp(0, G - 1)  # [C, 2s-1]
    Lf = eval_fn(g[fi])
    idx = torch.cat([ci[None, :].expand(C, -1), fi], dim=1)
    L = torch.cat([Lc, Lf], dim=1)
    m = L.min(dim=1, keepdim=True).values
    best = torch.where(L == m, idx, torch.full_like(idx, G)).min(dim=1).values
    return best, m[:, 0], Lc[:, coarse.index(one)]


@torch.no_grad()
def clip_weight(weight: torch.Tensor, fmt: "str | Format", *, method: str = "mse", grid: torch.Tensor | None = None,
                p: float = 2.4, inputs: torch.Tensor | None = None, quant_inputs: torch.Tensor | None = None,
                search: str = "grid", stride: int = 5, max_elems: int = _MAX_ELEMS) -> ClipResult:
    """Per-output-channel clipping search for a weight ``[out, in]``.

    Args:
        weight: [C, d] float.
        fmt: the element format.
        method: "mse" | "lp" | "output" | "none" (module docstring).
        grid: γ values [G] (default :func:`gamma_grid`).
        p: exponent of the L_p loss.
        inputs: [n, d] calibration rows X (``method="output"``); ``quant_inputs`` = Q(X) (default X).
        search: "grid" (every γ; default) or "coarse-fine" (see :func:`_search`), ``stride`` its step.
        max_elems: bound on the temporaries (elements per chunk).

    Returns:
        :class:`ClipResult` with ``alpha`` [C].
    """
    _check(method, p)
    fmt = parse_format(fmt)
    w = weight.detach().to(torch.float32)
    C, d = w.shape
    amax = w.abs().amax(dim=1)  # [C]
    if isinstance(fmt, NoFormat):
        z = torch.zeros(C)
        return ClipResult(amax, torch.ones(C), z, z, 0.0, "channel", method)
    g = torch.ones(1) if method == "none" else (gamma_grid() if grid is None else grid.to(torch.float32))
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    if method == "output":
        if inputs is None:
            raise ValueError("method='output' needs the calibration rows `inputs` [n, in]")
        X = inputs.detach().to(torch.float32).reshape(-1, d)
        Xq = X if quant_inputs is None else quant_inputs.detach().to(torch.float32).reshape(-1, d)
        n = X.shape[0]
        ref = X @ w.T  # [n, C]

    def evaluate(gm: torch.Tensor) -> torch.Tensor:  # gm [C, k] -> losses [C, k]
        k = gm.shape[1]
        out = torch.empty(C, k, dtype=torch.float64)
        per = max(1, max_elems // max(1, k * (max(d, n) if method == "output" else d)))
        for c0 in range(0, C, per):
            wc = w[c0:c0 + per]
            s = (safe[c0:c0 + per, None] * gm[c0:c0 + per] / fmt.max_value)[:, :, None]  # [c, k, 1]
            if method == "output":
                q = _fq(wc[:, None, :], s, fmt)  # [c, k, d]
                err = (Xq @ q.reshape(-1, d).T).reshape(n, len(wc), k) - ref[:, c0:c0 + per, None]
                out[c0:c0 + per] = (err * err).sum(dim=0).double()
            else:
                out[c0:c0 + per] = _scaled_loss(wc[:, None, :], s, fmt, method, p, 2)[:, :, 0].double()
        return out

    best, loss, loss_max = _search(evaluate, g, C, search, stride)
    gamma = g[best]
    alpha = amax * gamma
    scale = alpha_to_scale(alpha, fmt)[:, None]
    mse = float(((_fq(w, scale, fmt) - w) ** 2).mean())
    return ClipResult(alpha, gamma, loss, loss_max, mse, "channel", method)


@torch.no_grad()
def clip_activation(x: torch.Tensor, fmt: "str | Format", *, granularity: str = "tensor", method: str = "mse",
                    grid: torch.Tensor | None = None, p: float = 2.4, weight: torch.Tensor | None = None,
                    amax: "float | torch.Tensor | None" = None, search: str = "grid", stride: int = 5,
                    max_elems: int = _MAX_ELEMS) -> ClipResult:
    """Clipping search for activation rows ``x`` [n, d] with one γ shared by the whole tensor.

    Args:
        x: [n, d] calibration rows (any leading shape is flattened).
        fmt: the element format.
        granularity: "tensor" — static α = γ·max|x| over the calibration set; "token" — dynamic,
            α_t = γ·max|x_t| per row (γ is what is searched and stored).
        method: "mse" | "lp" | "output" | "none"; "output" needs ``weight`` [out, d] (already quantized,
            ‖X Wᵀ − Q(X) Wᵀ‖²).
        grid: γ values (default :func:`gamma_grid`).
        amax: ("tensor" only) the max-abs that γ multiplies, when it is known from more data than the
            rows ``x`` (e.g. the whole calibration set); default ``max|x|``.
        search, stride: as in :func:`clip_weight`.

    Returns:
        :class:`ClipResult` with 0-d ``alpha``/``gamma``.
    """
    _check(method, p)
    if granularity not in ("tensor", "token"):
        raise ValueError(f"activation granularity must be 'tensor' or 'token', got {granularity!r}")
    fmt = parse_format(fmt)
    d = x.shape[-1]
    X = x.detach().to(torch.float32).reshape(-1, d)
    n = X.shape[0]
    if n == 0:
        raise ValueError("clip_activation: no calibration rows")
    if granularity == "tensor":
        m = X.abs().amax()
        amax = (m if amax is None else torch.maximum(m, torch.as_tensor(amax, dtype=torch.float32))).reshape(1, 1)
    else:
        amax = X.abs().amax(dim=1, keepdim=True)  # [n, 1]
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    if isinstance(fmt, NoFormat):
        z = torch.zeros(())
        return ClipResult(amax.max(), torch.ones(()), z, z, 0.0, granularity, method)
    g = torch.ones(1) if method == "none" else (gamma_grid() if grid is None else grid.to(torch.float32))
    if method == "output":
        if weight is None:
            raise ValueError("method='output' needs the (quantized) weight [out, in]")
        Wt = weight.detach().to(torch.float32).T
        ref = X @ Wt
        width = max(d, Wt.shape[1])
    else:
        width = d

    def evaluate(gm: torch.Tensor) -> torch.Tensor:  # gm [1, k] -> [1, k]
        gv = gm[0]
        out = torch.empty(len(gv), dtype=torch.float64)
        per = max(1, max_elems // max(1, n * width))
        for g0 in range(0, len(gv), per):
            gg = gv[g0:g0 + per]
            s = (safe[None] * gg[:, None, None] / fmt.max_value)  # [k, n or 1, 1]
            if method == "output":
                q = _fq(X[None], s, fmt)  # [k, n, d]
                err = q @ Wt - ref[None]
                out[g0:g0 + per] = (err * err).sum(dim=(1, 2)).double()
            elif granularity == "tensor":
                out[g0:g0 + per] = _scaled_loss(X[None], s, fmt, method, p, (1, 2)).reshape(-1).double()
            else:
                out[g0:g0 + per] = _scaled_loss(X[None], s, fmt, method, p, 2).sum(dim=(1, 2)).double()
        return out[None, :]

    best, loss, loss_max = _search(evaluate, g, 1, search, stride)
    gamma = g[int(best[0])]
    s = safe * gamma / fmt.max_value
    mse = float(((_fq(X, s, fmt) - X) ** 2).mean())
    return ClipResult(amax.max() * gamma, gamma.clone(), loss[0], loss_max[0], mse, granularity, method)
