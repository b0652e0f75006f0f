"""Clipping-range search: choose the largest representable magnitude α of a quantization grid.

α, scale and exponent bias
--------------------------
For a format ``fmt`` with largest value ``fmt.max_value`` (integer default bias β₀), clipping at α means
using the scale ``s = α / fmt.max_value`` in :func:`~hqdit_utils.engine.quantizer.fake_quantize`:
``x_q = round_to_grid(x / s) · s``; values beyond ±α saturate. For an ExMy format the same grid is the
format with the real-valued exponent bias ``β(α) = 2^E − 1 − log2 α + log2(2 − 2^−M)``
(:func:`alpha_to_bias`, from :func:`~hqdit_utils.engine.formats.bias_for_clip`). So "clipping-range selection"
(the abstract's term) = "bias selection" = "scale selection"; this module searches α.

The search (our default, the paper's criterion is unknown; book/choices.md#choices-clipping)
---------------------------------------------------------------------------------------------
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

The MSE search without re-quantizing (``method="mse"``, per channel or per tensor)
----------------------------------------------------------------------------------
For a sign-symmetric saturating grid, ``Q(x)`` depends only on which interval between two rounding
thresholds ``|x| / s`` falls in. So the values ``|x|`` are sorted once (per channel / per tensor) with
prefix sums ``Σ|x|`` and ``Σx²`` (float64); for each γ the interval boundaries are found by binary search
and the loss is ``Σ_k [Σx² − 2 g_k s Σ|x| + n_k g_k² s²]`` over the grid values ``g_k`` — O(K log n) per
γ instead of a pass over every element per γ (:func:`_sorted_mse_evaluator`). The intervals are the ones
:func:`~hqdit_utils.engine.quantizer.round_to_grid` uses on ``fl32(|x| / s)``, ties included (the thresholds are
the exact float32 midpoints of the rounding, see :func:`_rounding_thresholds`); the losses differ from the
element-wise evaluation only by float rounding (the element-wise one rounds ``x / s`` and sums float32
squares; relative differences ~1e-7), so the chosen γ is the same except between two γ whose losses agree
to that precision. Other losses, per-token γ and asymmetric formats use the element-wise evaluation.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .formats import FloatFormat, Format, IntFormat, NoFormat, bias_for_clip, parse_format
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


@lru_cache(maxsize=None)
def _rounding_thresholds(fmt: Format) -> "tuple[torch.Tensor, torch.Tensor] | None":
    """For a sign-symmetric, saturating ``fmt``: ``(g, u)`` with ``g`` [K+1] the non-negative grid values
    (float64, ``g[0] = 0``) and ``u`` [K] float64 such that, for any real ``r = |x| / s >= 0``,
    ``round_to_grid(fl32(r)) = g[k]`` exactly when ``u[k-1] <= r < u[k]`` (``u[-1] = 0``, ``u[K] = inf``).

    ``u[k]`` is the real number at which ``fl32(r)`` reaches the first float32 ``b`` that rounds up to
    ``g[k+1]``: the midpoint between ``b`` and its float32 predecessor, nudged up by one float64 ulp when
    float32 rounding sends that midpoint down (ties to even). ``None`` for formats this does not cover
    (unsigned integers, non-saturating floats)."""
    if isinstance(fmt, IntFormat) and not fmt.signed or isinstance(fmt, FloatFormat) and not fmt.saturate:
        return None
    if not isinstance(fmt, (IntFormat, FloatFormat)):
        return None
    grid = fmt.grid().to(torch.float32)
    g = grid[grid >= 0].numpy()
    u = []
    for lo, hi in zip(g[:-1], g[1:]):
        b = np.float32((np.float64(lo) + np.float64(hi)) / 2)  # midpoints of ≤ 16-bit grids are float32-exact
        up = lambda v: float(round_to_grid(torch.tensor([v], dtype=torch.float32), fmt)[0])  # noqa: E731
        if up(b) != hi:
            b = np.nextafter(b, np.float32(np.inf))
        prev = np.nextafter(b, np.float32(0))
        if up(b) != hi or up(prev) != lo:
            return None  # not monotone between two grid values: leave it to the element-wise path
        mid = (np.float64(prev) + np.float64(b)) / 2  # exact; r = mid rounds to the float32 with an even mantissa
        b_even = int(np.array(b, dtype=np.float32).view(np.int32)) % 2 == 0
        u.append(mid if b_even else np.nextafter(mid, np.inf))
    return torch.from_numpy(g.astype(np.float64)), torch.tensor(u, dtype=torch.float64)


def _sorted_abs(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` [C, n] (float32) sorted along the last axis. Non-negative float32 values sort like their bit
    patterns read as int32, which sorts several times faster (torch for one long row, NumPy for many rows:
    the faster of the two here)."""
    bits = x.detach().to(torch.float32).abs().contiguous().view(torch.int32)
    if x.shape[0] == 1:
        return torch.sort(bits, dim=1).values.view(torch.float32)
    return torch.from_numpy(np.sort(bits.numpy(), axis=1)).view(torch.float32)


_PREFIX_CACHE: dict = {}  # id(source tensor) -> (weakref, version, shape, (a, p1, p2))


def _sorted_prefix(xa: torch.Tensor, source: torch.Tensor):
    """Sorted ``|xa|`` [C, n] and its prefix sums ``p1 = Σ|x|``, ``p2 = Σx²`` [C, n + 1] (float64).

    Format-independent, so the searches of several candidate formats on the same ``source`` tensor (the
    caller's argument; ``xa`` is a view of it) share one sort. An entry lives as long as ``source`` (weak
    reference) and is used only while ``source`` is unchanged (version counter)."""
    key = id(source)
    hit = _PREFIX_CACHE.get(key)
    if hit is not None and hit[0]() is source and hit[1] == source._version and hit[2] == tuple(xa.shape):
        return hit[3]
    a = _sorted_abs(xa).double()  # float32 values are exact in float64
    zero = torch.zeros(a.shape[0], 1, dtype=torch.float64)
    out = (a, torch.cat([zero, a.cumsum(dim=1)], dim=1), torch.cat([zero, (a * a).cumsum(dim=1)], dim=1))
    if not source.is_inference():
        ref = weakref.ref(source, lambda _, k=key: _PREFIX_CACHE.pop(k, None))
        _PREFIX_CACHE[key] = (ref, source._version, tuple(xa.shape), out)
    return out


def _sorted_mse_evaluator(xa: torch.Tensor, safe: torch.Tensor, fmt: Format, max_elems: int,
                          source: torch.Tensor | None = None):
    """``eval_fn(gm [C, k]) -> Σ (Q(x) − x)² [C, k]`` (float64) for rows ``xa`` [C, n] (any sign) with
    scales ``s = safe[c] · γ / max_value`` (computed in float32, as the element-wise path does), from sorted
    ``|x|`` and prefix sums (module docstring; shared through ``source``, see :func:`_sorted_prefix`).
    ``None`` if ``fmt`` is not covered."""
    th = _rounding_thresholds(fmt)
    if th is None:
        return None
    g, u = th
    C, n = xa.shape
    a, p1, p2 = _sorted_prefix(xa, xa if source is None else source)
    K = len(u)
    total1, total2 = p1[:, -1:], p2[:, -1:]

    def evaluate(gm: torch.Tensor) -> torch.Tensor:
        k = gm.shape[1]
        out = torch.empty(C, k, dtype=torch.float64)
        per = max(1, max_elems // max(1, k * (K + 1)))
        for c0 in range(0, C, per):
            c1 = min(C, c0 + per)
            s = (safe[c0:c1, None] * gm[c0:c1] / fmt.max_value).double()  # [c, k], float32 values
            # index of the first |x| in each interval: |x| >= u·s (u·s is exact in float64: ≤ 53 bits)
            idx = torch.searchsorted(a[c0:c1], (s[:, :, None] * u).reshape(c1 - c0, -1)).reshape(c1 - c0, k, K)
            s1 = torch.gather(p1[c0:c1], 1, idx.reshape(c1 - c0, -1)).reshape(c1 - c0, k, K)
            s2 = torch.gather(p2[c0:c1], 1, idx.reshape(c1 - c0, -1)).reshape(c1 - c0, k, K)
            cnt = idx.double()
            # interval sums: [0, idx_0), [idx_0, idx_1), …, [idx_{K-1}, n)
            c_k = torch.diff(cnt, dim=2, prepend=torch.zeros(c1 - c0, k, 1, dtype=torch.float64),
                             append=torch.full((c1 - c0, k, 1), float(n), dtype=torch.float64))
            a_k = torch.diff(s1, dim=2, prepend=torch.zeros(c1 - c0, k, 1, dtype=torch.float64),
                             append=total1[c0:c1, None].expand(-1, k, 1))
            q_k = torch.diff(s2, dim=2, prepend=torch.zeros(c1 - c0, k, 1, dtype=torch.float64),
                             append=total2[c0:c1, None].expand(-1, k, 1))
            v = g * s[:, :, None]  # [c, k, K+1] the quantized magnitudes g_k · s
            out[c0:c1] = (q_k - 2 * v * a_k + c_k * v * v).sum(dim=2)
        return out
    return evaluate


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

    fast = _sorted_mse_evaluator(w, safe, fmt, max_elems, weight) if method == "mse" and len(g) > 1 else None
    best, loss, loss_max = _search(fast or evaluate, g, C, search, stride)
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

    fast = None
    if method == "mse" and granularity == "tensor" and len(g) > 1:
        fast = _sorted_mse_evaluator(X.reshape(1, -1), safe.reshape(1), fmt, max_elems, x)
    best, loss, loss_max = _search(fast or evaluate, g, 1, search, stride)
    gamma = g[int(best[0])]
    s = safe * gamma / fmt.max_value
    mse = float(((_fq(X, s, fmt) - X) ** 2).mean())
    return ClipResult(amax.max() * gamma, gamma.clone(), loss[0], loss_max[0], mse, granularity, method)
