"""GPTQ weight quantization on any grid (FP ExMy or INT), with a per-output-row scale.

What GPTQ does (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023 — the published algorithm)
------------------------------------------------------------------------------------------------
For a linear layer with weight ``W`` [out, in] and calibration inputs ``X`` [N, in], GPTQ minimises the
layer-output error ``‖X Wᵀ − X Ŵᵀ‖²`` row by row. With the Hessian of that loss
``H = 2/N · Xᵀ X`` [in, in] it quantizes the columns of ``W`` one after another; after rounding column
``j`` it spreads the rounding error onto the not-yet-quantized columns through the inverse Hessian, so
later columns compensate for earlier errors. Concretely (published algorithm):

1. dead inputs (``H_jj = 0``: the input channel is always 0) get ``H_jj = 1`` and weight column 0;
2. damping: ``H += λ I`` with ``λ = percdamp · mean(diag H)``;
3. ``U`` = upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = Uᵀ U``);
4. for each column ``j``: ``q_j = quant(w_j)``, ``e_j = (w_j − q_j) / U_jj``,
   ``w_k −= e_j · U_jk`` for ``k > j`` — done lazily in blocks of ``blocksize`` columns (the in-block
   updates are rank-1, the rest of the matrix is updated once per block by one matmul);
5. optional "act-order": process columns by decreasing ``H_jj``; optional groups of ``groupsize``
   columns with their own scales.

The proxy loss GPTQ reports is ``Σ_j ‖w_j − q_j‖² / (2 U_jj²)``.

What is ours (not GPTQ's, not the HQ-DiT paper's; book/choices.md#choices-gptq)
-------------------------------------------------------------------------------
* **Pluggable grid**: ``quant(w) = round_to_grid(w / s, fmt) · s`` with one scale ``s`` per output row
  (``s = max|W_row| / fmt.max_value`` unless given; the PTQ engine passes clipped scales), for any
  :class:`~hqdit_utils.engine.formats.FloatFormat` or :class:`~hqdit_utils.engine.formats.IntFormat` — GPTQ's
  reference code rounds onto a uniform INT grid only. A summary of HQ-DiT says GPTQ is "adapted to
  FP"; how is unknown, and this is our reading.
* **Defaults** block size 128, damping 1 % of the mean diagonal, natural column order, scale fixed
  before GPTQ from the *original* weight — GPTQ's own defaults; the paper states none.
* **Robustness**: the Hessian is accumulated and Cholesky-factorised in float64 (the triangular inverse
  and the sweep run in float32, as in GPTQ's reference code). If
  the Cholesky factorisation fails, or a pivot is numerically zero (``L_jj² ≤ 1e-10 · max diag H``), the
  damping is raised ×10 (at least to ``1e-6 · mean diag``) and retried up to ``max_retries`` times, and
  the number of retries is reported; if every attempt fails, the columns are quantized independently
  (round-to-nearest, ``fallback="rtn"``) rather than raising. GPTQ's reference code simply crashes.
* ``U`` is computed as ``J L⁻¹ J`` where ``J H J = L Lᵀ`` (``J`` reverses the order): one Cholesky and
  one triangular inverse instead of Cholesky → inverse → Cholesky; it is the same unique factor.
* With ``groupsize``, a group's max-abs scale is taken from the *current* (error-updated) weights of the
  group's columns when the sweep reaches the group (GPTQ's reference code ignores the in-block updates
  of the current block at that point).

Determinism: no random numbers; ties in act-order are broken by a stable sort; on CPU the result is
bit-for-bit reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .formats import Format, NoFormat, parse_format
from .quantizer import max_abs_scale, round_to_grid

__all__ = ["GPTQ", "GPTQResult", "gptq_quantize", "rtn_quantize"]

#: A Cholesky pivot ``L_jj²`` at or below this fraction of ``max(diag H)`` counts as a failure (ours).
PIVOT_RTOL = 1e-10


@dataclass
class GPTQResult:
    """What :meth:`GPTQ.quantize` returns.

    Attributes:
        weight: [out, in] the quantized weight (dequantized values on ``fmt``'s grid times the scale),
            in the dtype of the input weight. Columns of dead inputs are 0.
        scale: [out] per-row scale, or [out, n_groups] with ``groupsize`` (float32).
        g_idx: [in] group index of each input column (``None`` without ``groupsize``); with act-order the
            groups follow the processing order, so ``g_idx`` need not be sorted.
        damping: the absolute λ that was finally added to the Hessian diagonal.
        percdamp: ``λ / mean(diag H)`` — equals the requested ``percdamp`` unless retries raised it.
        retries: how many times the damping had to be raised (0 = first attempt succeeded).
        dead_columns: int64 indices of inputs with ``H_jj = 0``.
        loss: GPTQ's proxy loss ``Σ ‖w_j − q_j‖² / (2 U_jj²)`` (sum over rows and columns).
        fallback: ``None``, or ``"rtn"`` if no damping made the Hessian factorisable.
        fmt: the name of the format.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    damping: float
    percdamp: float
    retries: int
    dead_columns: torch.Tensor
    loss: float
    fmt: str
    g_idx: torch.Tensor | None = None
    fallback: str | None = None
    info: dict = field(default_factory=dict)


class GPTQ:
    """Accumulate a layer's input Hessian, then quantize its weight with GPTQ.

    Usage::

        g = GPTQ(weight)                   # weight [out, in] (a Tensor or an nn.Linear's .weight)
        for x in batches: g.add_batch(x)   # x [n, in] (or [..., in]): the layer's (rotated) inputs
        res = g.quantize("fp4_e2m1", scale=None)   # -> GPTQResult
        w_q = res.weight

    The weight passed in is never modified.
    """

    def __init__(self, weight: torch.Tensor, *, hessian_dtype: torch.dtype = torch.float64):
        if weight.dim() != 2:
            raise ValueError(f"GPTQ needs a weight [out, in], got shape {tuple(weight.shape)}")
        self.weight = weight.detach()
        self.rows, self.columns = weight.shape
        self.hessian_dtype = hessian_dtype
        self._xtx = torch.zeros(self.columns, self.columns, dtype=hessian_dtype, device=weight.device)
        self.nsamples = 0

    def add_batch(self, inputs: torch.Tensor) -> "GPTQ":
        """Add calibration rows ``inputs`` [n, in] (any leading shape, flattened to rows).

        Accumulates ``Σ xᵀx`` in ``hessian_dtype`` (float64 by default; each batch's product is computed
        in float32 for float32 inputs — our choice, for speed — and added in ``hessian_dtype``).
        """
        if inputs.shape[-1] != self.columns:
            raise ValueError(f"inputs have {inputs.shape[-1]} features, the weight has {self.columns} columns")
        x = inputs.detach().reshape(-1, self.columns).to(self._xtx.device)
        if x.shape[0] == 0:
            return self
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(work)
        self._xtx += (x.t() @ x).to(self.hessian_dtype)
        self.nsamples += x.shape[0]
        return self

    @property
    def hessian(self) -> torch.Tensor:
        """``H = 2/N · Xᵀ X`` [in, in] (a new tensor; zeros before any batch)."""
        if self.nsamples == 0:
            return torch.zeros_like(self._xtx)
        return self._xtx * (2.0 / self.nsamples)

    def set_hessian(self, hessian: torch.Tensor, nsamples: int = 1) -> "GPTQ":
        """Use a precomputed Hessian (e.g. shared by layers reading the same input); replaces the
        accumulated one. ``hessian`` is ``2/N · XᵀX``."""
        if hessian.shape != (self.columns, self.columns):
            raise ValueError(f"hessian must be [{self.columns}, {self.columns}], got {tuple(hessian.shape)}")
        self._xtx = hessian.detach().to(self.hessian_dtype).clone() * (nsamples / 2.0)
        self.nsamples = nsamples
        return self

    # ------------------------------------------------------------------------------------------------
    def quantize(
        self,
        fmt: "str | Format",
        scale: torch.Tensor | None = None,
        *,
        blocksize: int = 128,
        percdamp: float = 0.01,
        groupsize: int | None = None,
        act_order: bool = False,
        max_retries: int = 8,
    ) -> GPTQResult:
        """Quantize the weight with GPTQ onto ``fmt``'s grid.

        Args:
            fmt: a FloatFormat/IntFormat or its name (``"fp4_e2m1"``, ``"int4"``…). ``"fp32"`` returns the
                weight unchanged.
            scale: [out] (or [out, 1]) per-row scale; [out, n_groups] with ``groupsize``. ``None`` =
                max-abs of the original weight per row (per group with ``groupsize``). Must be finite and
                ``>= 0``; a zero scale (an all-zero row) is replaced by 1.
            blocksize: columns per lazy-update block (128, GPTQ's default).
            percdamp: damping ``λ = percdamp · mean(diag H)`` (0.01, GPTQ's default).
            groupsize: columns sharing one scale (``None`` = one scale per row).
            act_order: process columns in decreasing ``diag H`` order.
            max_retries: how many times to raise the damping ×10 after a failed factorisation.

        Returns a :class:`GPTQResult`. Never raises on a singular Hessian; raises ``ValueError`` on
        a non-finite Hessian/weight (a data problem, not a singularity) and on bad arguments.
        """
        fmt = parse_format(fmt)
        w0 = self.weight
        out_dtype = w0.dtype
        ncol = self.columns
        if self.nsamples == 0:
            raise ValueError("GPTQ.quantize: no calibration data (call add_batch first)")
        if isinstance(fmt, NoFormat):
            return GPTQResult(weight=w0.clone(), scale=torch.ones(self.rows), damping=0.0, percdamp=0.0,
                              retries=0, dead_columns=torch.zeros(0, dtype=torch.long), loss=0.0, fmt=str(fmt))
        if blocksize < 1:
            raise ValueError("blocksize must be >= 1")
        if groupsize is not None and groupsize < 1:
            raise ValueError("groupsize must be >= 1 (or None)")
        W = w0.to(torch.float32).clone()
        if not bool(torch.isfinite(W).all()):
            raise ValueError("GPTQ.quantize: the weight holds NaN/Inf")
        H = self.hessian.to(torch.float64)
        if not bool(torch.isfinite(H).all()):
            raise ValueError("GPTQ.quantize: the Hessian holds NaN/Inf (non-finite calibration inputs?)")

        # --- scales (from the original weight, as GPTQ's reference code does) ---------------------------
        row_scale = None
        group_scales = None
        if groupsize is None:
            if scale is None:
                row_scale = max_abs_scale(W, fmt, axis=0).reshape(-1)
            else:
                row_scale = _check_scale(scale, (self.rows,), "scale").reshape(-1).to(W.device)
        else:
            n_groups = math.ceil(ncol / groupsize)
            if scale is not None:
                group_scales = _check_scale(scale, (self.rows, n_groups), "scale").to(W.device)

        # --- dead inputs (published GPTQ) ---------------------------------------------------------------
        diag = torch.diagonal(H)
        dead = diag == 0
        dead_idx = torch.nonzero(dead).flatten().cpu()
        if bool(dead.any()):
            H[dead, dead] = 1.0
            W[:, dead] = 0.0

        perm = invperm = None
        if act_order:
            perm = torch.sort(torch.diagonal(H), descending=True, stable=True).indices
            W = W[:, perm]
            H = H[perm][:, perm]
            invperm = torch.argsort(perm)

        # --- damping + factorisation, with retries (ours) -----------------------------------------------
        U, lam, retries, fallback = _inverse_cholesky_with_retries(H, percdamp, max_retries)
        mean_diag = float(torch.diagonal(H).mean())
        U = U.to(torch.float32)

        # --- the GPTQ sweep (published algorithm, lazy block updates) -----------------------------------
        Q = torch.zeros_like(W)
        losses = torch.zeros(self.rows, dtype=torch.float64, device=W.device)
        used_scales = [] if groupsize is not None else None
        s_cur = row_scale
        for i1 in range(0, ncol, blocksize):
            i2 = min(i1 + blocksize, ncol)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Sq1 = torch.zeros_like(W1)  # squared rounding errors, turned into the proxy loss per block
            U1 = U[i1:i2, i1:i2]
            for i in range(count):
                j = i1 + i
                if groupsize is not None and j % groupsize == 0:
                    g = j // groupsize
                    if group_scales is not None:
                        s_cur = group_scales[:, g]
                    else:
                        cur = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :groupsize]
                        s_cur = max_abs_scale(cur, fmt, axis=0).reshape(-1)
                    used_scales.append(s_cur.clone())
                w = W1[:, i]
                d = U1[i, i]
                q = round_to_grid(w / s_cur, fmt) * s_cur
                Q1[:, i] = q
                diff = w - q
                Sq1[:, i] = diff * diff
                err = diff / d
                if i + 1 < count:
                    W1[:, i + 1:].addr_(err, U1[i, i + 1:], alpha=-1.0)
                Err1[:, i] = err
            Q[:, i1:i2] = Q1
            losses += (Sq1.double() / (2.0 * torch.diagonal(U1).double() ** 2)).sum(dim=1)
            if i2 < ncol:
                W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)

        g_idx = None
        if groupsize is not None:
            out_scale = torch.stack(used_scales, dim=1)
            pos = torch.arange(ncol)
            g_idx = pos // groupsize
            if invperm is not None:
                g_idx = g_idx[invperm.cpu()]
        else:
            out_scale = row_scale
        if invperm is not None:
            Q = Q[:, invperm]
        return GPTQResult(
            weight=Q.to(out_dtype),
            scale=out_scale.to(torch.float32),
            damping=lam,
            percdamp=lam / mean_diag if mean_diag > 0 else float("nan"),
            retries=retries,
            dead_columns=dead_idx,
            loss=float(losses.sum()),
            fmt=str(fmt),
            g_idx=g_idx,
            fallback=fallback,
            info={"blocksize": blocksize, "act_order": act_order, "groupsize": groupsize,
                  "nsamples": self.nsamples, "requested_percdamp": percdamp},
        )


def _check_scale(scale, shape: tuple, what: str) -> torch.Tensor:
    s = torch.as_tensor(scale, dtype=torch.float32)
    if s.numel() != math.prod(shape):
        raise ValueError(f"{what} must have {math.prod(shape)} elements (shape {shape}), got shape {tuple(s.shape)}")
    s = s.reshape(shape).clone()
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError(f"{what} must be finite and >= 0")
    s[s == 0] = 1.0
    return s


def _inverse_cholesky_with_retries(H: torch.Tensor, percdamp: float, max_retries: int,
                                   inverse_dtype: torch.dtype = torch.float32):
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``(H + λI)⁻¹ = Uᵀ U``), in ``inverse_dtype``.

    Tries ``λ = percdamp · mean(diag H)`` first; on failure (Cholesky error, a pivot
    ``L_jj² ≤ PIVOT_RTOL · max diag``, or a non-finite inverse) multiplies λ by 10 (at least
    ``1e-6 · mean diag``) up to ``max_retries`` times. Returns ``(U, λ, retries, fallback)``; if all
    attempts fail, ``U = diag((diag H + λ)^(-1/2))`` (no error propagation: round-to-nearest) and
    ``fallback = "rtn"``.
    """
    n = H.shape[0]
    diag = torch.diagonal(H)
    mean_diag = float(diag.mean())
    if percdamp < 0:
        raise ValueError("percdamp must be >= 0")
    lam = percdamp * mean_diag
    # J H J = L Lᵀ  =>  H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J) = Uᵀ U with U = J L⁻¹ J upper triangular.
    h_flip = torch.flip(H, dims=(0, 1))
    max_diag = float(diag.max())
    for attempt in range(max_retries + 1):
        hd = h_flip.clone()
        torch.diagonal(hd).add_(lam)
        L, info = torch.linalg.cholesky_ex(hd)
        del hd
        ok = int(info) == 0
        if ok:
            piv = torch.diagonal(L) ** 2
            ok = bool(torch.isfinite(piv).all()) and float(piv.min()) > PIVOT_RTOL * (max_diag + lam)
        if ok:
            # The triangular inverse runs in ``inverse_dtype`` (float32 by default, like GPTQ's reference
            # code: after damping, cond(L) <= sqrt(cond(H)) is modest); the factorisation and its pivot
            # check in float64.
            L = L.to(inverse_dtype)
            eye = torch.eye(n, dtype=inverse_dtype, device=H.device)
            U = torch.flip(torch.linalg.solve_triangular(L, eye, upper=False), dims=(0, 1))
            if bool(torch.isfinite(U).all()):
                return U, lam, attempt, None
        if attempt < max_retries:
            lam = max(lam * 10.0, 1e-6 * mean_diag, 1e-12)
    dd = (diag + lam).clamp_min(1e-12)
    return torch.diag(dd.rsqrt()).to(inverse_dtype), lam, max_retries, "rtn"


def rtn_quantize(weight: torch.Tensor, fmt: "str | Format", scale: torch.Tensor | None = None) -> torch.Tensor:
    """Round-to-nearest with the same per-row scale convention as GPTQ (the baseline GPTQ is compared to)."""
    fmt = parse_format(fmt)
    if isinstance(fmt, NoFormat):
        return weight.clone()
    W = weight.to(torch.float32)
    s = max_abs_scale(W, fmt, axis=0) if scale is None else _check_scale(scale, (W.shape[0],), "scale").reshape(-1, 1)
    return (round_to_grid(W / s, fmt) * s).to(weight.dtype)


def gptq_quantize(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    fmt: "str | Format",
    *,
    scale: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    groupsize: int | None = None,
    act_order: bool = False,
) -> torch.Tensor:
    """GPTQ-quantize ``weight`` [out, in] given calibration ``inputs`` [n, in] (rotated, if the layer is);
    returns the quantized weight [out, in] (same dtype). ``scale`` [out]: per-row scale (default max-abs).
    See :class:`GPTQ` for the details and :meth:`GPTQ.quantize` for the diagnostics."""
    return GPTQ(weight).add_batch(inputs).quantize(
        fmt, scale, blocksize=blocksize, percdamp=percdamp, groupsize=groupsize, act_order=act_order
    ).weight
