"""Fake quantization: round a tensor onto a format's grid and scale it back.

``fake_quantize(x, fmt, scale)`` returns ``round_to_grid(x / scale, fmt) * scale`` in the dtype of ``x``:
the values a real low-precision kernel would compute with, simulated in float32. Rounding is to the
nearest grid value with ties to even (the value whose last mantissa bit is 0), overflow saturates at
±``fmt.max_value``. The scale is where a clipping value or a real-valued exponent bias goes (see
``formats.py``).

Granularity of ``scale=None`` (max-abs scaling, ``scale = amax / fmt.max_value``):

* ``axis=None`` — one scale for the whole tensor;
* ``axis=k`` — one scale per index along dimension ``k`` (weight ``[out, in]``: ``axis=0`` is per output
  channel; activation ``[tokens, features]``: ``axis=0`` is per token);
* ``block_size=b`` — one scale per block of ``b`` consecutive elements along the last dimension, the scale
  itself stored in ``scale_format``: ``"e8m0"`` (a power of two, OCP MX: MXFP4 = fp4_e2m1, b = 32) or
  ``"fp8_e4m3fn"`` (NVFP4: b = 16, plus one float32 per-tensor scale so the block scales use the
  E4M3 range), or ``None`` (float32 block scales). Scales never underflow to zero: an E8M0 scale is at
  least 2^-127 (a block of float32 subnormals stays finite, its zeros zero), and an E4M3 block scale that
  would round to zero takes E4M3's smallest subnormal 2^-9 (times the tensor scale; our choice, see
  ``_block_scales``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .formats import FloatFormat, Format, IntFormat, NoFormat, parse_format

_EXP_MASK = 0x7F800000  # the 8 exponent bits of an IEEE float32
_E8M0_MIN = 2.0 ** -127  # the smallest E8M0 (OCP MX) scale: a float32 subnormal


def _check_finite(x: torch.Tensor, what: str = "input") -> None:
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(x.numel() - finite.sum() - n_nan)
        raise ValueError(
            f"fake_quantize: the {what} has {n_nan} NaN and {n_inf} Inf element(s) out of {x.numel()} "
            f"(shape {tuple(x.shape)}); quantization scales would be meaningless. Find where they come "
            "from, or pass check_finite=False to skip this check."
        )


def round_to_grid(x: torch.Tensor, fmt: "str | Format") -> torch.Tensor:
    """Round ``x`` (already divided by its scale) to the nearest value of ``fmt``'s grid.

    Ties go to even, overflow saturates at ±``fmt.max_value`` (or becomes ±inf/NaN for a
    non-saturating format). Works on any shape; computes in float32 and returns ``x``'s dtype.

    For a float format the spacing of the grid around ``|x|`` is ``2^(max(⌊log2|x|⌋, 1-β) - M)``;
    ``⌊log2|x|⌋`` is read exactly from the exponent bits of the float32 representation, so the
    rounding is a handful of element-wise operations and agrees bit for bit with ml_dtypes' casts.
    """
    fmt = parse_format(fmt)
    if isinstance(fmt, NoFormat):
        return x
    dtype = x.dtype
    xf = x.to(torch.float32)
    if isinstance(fmt, IntFormat):
        out = torch.round(xf).clamp_(fmt.min_value, fmt.max_value)
        return out.to(dtype)
    if not isinstance(fmt, FloatFormat):
        raise TypeError(f"round_to_grid: unsupported format {fmt!r}")
    # step = 2^(max(floor(log2|x|), 1-β) - M). floor(log2|x|) is read from the float32 exponent bits;
    # the clamp and the "- M" are done on those bits as integers (one buffer, three in-place passes).
    min_pow2 = 2.0 ** fmt.min_exponent
    if fmt.min_exponent - fmt.man_bits >= -126:  # the step stays a normal float32
        step_bits = xf.view(torch.int32) & _EXP_MASK
        step_bits.clamp_(min=(fmt.min_exponent + 127) << 23).sub_(fmt.man_bits << 23)
        step = step_bits.view(torch.float32)
    else:  # E = 8 formats: the smallest steps are float32 subnormals
        step = (xf.view(torch.int32) & _EXP_MASK).view(torch.float32)
        step = step.clamp_(min=min_pow2).mul_(2.0 ** -fmt.man_bits)
    t = xf / step
    out = torch.round(t) if fmt.man_bits == 0 else t.round_()
    out.mul_(step)
    if fmt.man_bits == 0:
        # With no mantissa bits the code's last bit is the exponent's: a tie at 1.5·2^k goes to whichever
        # of 2^k, 2^(k+1) has an even exponent code (torch.round would always pick 2^(k+1)).
        code = ((step.view(torch.int32) >> 23) & 0xFF) - 127 + fmt.exponent_bias
        out = torch.where((t.abs() == 1.5) & (code % 2 == 0), torch.copysign(step, xf), out)
    if not fmt.subnormals:
        # Without subnormals the only value below 2^(1-β) is zero: round half-way to the nearer of 0, min_normal.
        small = xf.abs() < min_pow2
        out = torch.where(small, torch.where(xf.abs() > min_pow2 / 2, torch.sign(xf) * min_pow2, 0.0), out)
    vmax = fmt.max_value
    if fmt.saturate:
        out.clamp_(-vmax, vmax)
    else:
        over = out.abs() > vmax
        if bool(over.any()):
            fill = torch.copysign(torch.full_like(out, math.inf), xf) if fmt.special == "ieee" \
                else torch.full_like(out, math.nan)
            out = torch.where(over, fill, out)
    return out.to(dtype)


def round_to_grid_(t: torch.Tensor, fmt: Format) -> torch.Tensor:
    """:func:`round_to_grid` of a float32 tensor ``t`` that the caller owns and no longer needs: the common
    cases (saturating float formats with subnormals and M ≥ 1 whose steps are normal floats, and signed
    integers) are computed in place, with the same operations as :func:`round_to_grid`, so the result is
    bit-identical with two full-size temporaries fewer; other formats go through :func:`round_to_grid`."""
    if isinstance(fmt, IntFormat) and fmt.signed:
        return t.round_().clamp_(fmt.min_value, fmt.max_value)
    if (isinstance(fmt, FloatFormat) and fmt.man_bits > 0 and fmt.subnormals and fmt.saturate
            and fmt.min_exponent - fmt.man_bits >= -126):
        step_bits = t.view(torch.int32) & _EXP_MASK
        step_bits.clamp_(min=(fmt.min_exponent + 127) << 23).sub_(fmt.man_bits << 23)
        step = step_bits.view(torch.float32)
        vmax = fmt.max_value
        return t.div_(step).round_().mul_(step).clamp_(-vmax, vmax)
    return round_to_grid(t, fmt)


def max_abs_scale(x: torch.Tensor, fmt: "str | Format", axis: int | None = None) -> torch.Tensor:
    """The max-abs scale ``amax / fmt.max_value``: a 0-d tensor (``axis=None``) or one value per index
    along ``axis``, shaped to broadcast against ``x``. All-zero slices get scale 1."""
    fmt = parse_format(fmt)
    if axis is None:
        lo, hi = torch.aminmax(x.detach())
        amax = torch.maximum(-lo, hi).to(torch.float32)
    else:
        xa = x.detach().abs().to(torch.float32)
        axis = axis % x.dim()
        dims = [d for d in range(x.dim()) if d != axis]
        amax = xa.amax(dim=dims, keepdim=True) if dims else xa
    return torch.where(amax > 0, amax / fmt.max_value, torch.ones_like(amax))


def _block_scales(xb: torch.Tensor, fmt: Format, scale_format: "str | Format | None") -> torch.Tensor:
    """Scales for blocks ``xb`` [..., n_blocks, block] (float32), shaped [..., n_blocks, 1]."""
    amax = xb.abs().amax(dim=-1, keepdim=True)
    if scale_format is None:
        return torch.where(amax > 0, amax / fmt.max_value, torch.ones_like(amax))
    if scale_format == "e8m0":
        # OCP MX: shared exponent = floor(log2 amax) - emax(element format), at least E8M0's smallest exponent
        # -127; elements above max saturate. A block whose max is a float32 subnormal (< 2^-126, where the
        # exponent bits read 0) or just above it thus gets the scale 2^-127, not 0 (which made its zeros NaN).
        emax_elem = math.floor(math.log2(fmt.max_value))
        pow2 = (amax.view(torch.int32) & _EXP_MASK).view(torch.float32)
        s = (pow2 * 2.0 ** -emax_elem).clamp_(min=_E8M0_MIN)
        return torch.where(amax > 0, s, torch.ones_like(s))
    sfmt = parse_format(scale_format)
    if isinstance(sfmt, NoFormat):
        return torch.where(amax > 0, amax / fmt.max_value, torch.ones_like(amax))
    # Two-level scaling (NVFP4 for sfmt = fp8_e4m3fn): one float32 tensor scale maps the largest block
    # scale onto the scale format's max; block scales are then rounded onto the scale format's grid. A block
    # scale that rounds to zero (block max below ~2^-10·6·s2, i.e. ≈ 2.2e-6 × the tensor max for NVFP4) takes
    # the scale format's smallest positive value instead (our choice: the smallest scale a real encoder can
    # store that is not zero; a zero scale would erase the block) — never a scale no stored code gives.
    tensor_amax = amax.amax()
    if tensor_amax == 0:
        return torch.ones_like(amax)
    s2 = tensor_amax / (fmt.max_value * sfmt.max_value)
    return round_to_grid(amax / fmt.max_value / s2, sfmt).clamp_(min=sfmt.min_subnormal) * s2


def fake_quantize(
    x: torch.Tensor,
    fmt: "str | Format",
    scale: "torch.Tensor | float | None" = None,
    *,
    axis: int | None = None,
    block_size: int | None = None,
    scale_format: "str | Format | None" = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Quantize ``x`` onto ``fmt``'s grid and return the dequantized values (same shape and dtype).

    Args:
        x: any shape, float32/float16/bfloat16, CPU or CUDA.
        fmt: a format or its name (``"fp4_e2m1"``, ``"int4"``, ``"fp32"`` …).
        scale: ``x_q = round_to_grid(x / scale) * scale``. A float, or a tensor broadcastable to ``x``
            (one value per channel, per token, …). ``None`` = max-abs scale at the granularity below.
        axis: with ``scale=None``: one scale per index along this dimension (``None``: per tensor).
        block_size: with ``scale=None``: one scale per block of this many elements along the last dim.
        scale_format: storage format of block scales: ``"e8m0"`` (MX), ``"fp8_e4m3fn"`` (NVFP4) or ``None``.
        check_finite: raise if ``x`` holds NaN/Inf (costs one pass over ``x``).

    Raises:
        ValueError: non-finite input, a non-float input, an ``axis`` that is not a dimension of ``x``, a
            block size that does not divide the last dimension, a scale that does not broadcast, or both
            ``axis`` and ``block_size`` given.
    """
    fmt = parse_format(fmt)
    if isinstance(fmt, NoFormat):
        return x
    if not torch.is_floating_point(x):
        raise ValueError(f"fake_quantize: expected a floating-point tensor, got {x.dtype}")
    dtype = x.dtype
    xf = x.to(torch.float32)
    if check_finite and xf.numel():
        lo, hi = torch.aminmax(xf)  # NaN propagates and ±inf shows at an end: one pass, no buffer
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            _check_finite(xf)
    if axis is not None and not (isinstance(axis, int) and -x.dim() <= axis < x.dim()):
        raise ValueError(f"fake_quantize: axis={axis!r} is not a dimension of x of shape {tuple(x.shape)}; "
                         f"use an integer in [{-x.dim()}, {x.dim() - 1}]")
    if block_size is not None:
        if scale is not None or axis is not None:
            raise ValueError("fake_quantize: block_size computes its own scales; do not pass scale or axis with it")
        if not isinstance(block_size, int) or block_size <= 0 or x.dim() == 0 or x.shape[-1] % block_size:
            raise ValueError(
                f"fake_quantize: block_size={block_size!r} must be a positive integer and must divide the last dimension "
                f"(shape {tuple(x.shape)}); pad the tensor or choose a divisor of {x.shape[-1] if x.dim() else 0}"
            )
        xb = xf.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
        s = _block_scales(xb, fmt, scale_format)
        return round_to_grid_(xb / s, fmt).mul_(s).reshape(x.shape).to(dtype)
    if scale is None:
        s = max_abs_scale(xf, fmt, axis)
    else:
        if axis is not None:
            raise ValueError("fake_quantize: pass either scale or axis (axis only chooses max-abs granularity)")
        if isinstance(scale, (str, bytes, bool, complex)) or (torch.is_tensor(scale) and (
                scale.is_complex() or scale.dtype == torch.bool)):
            raise ValueError(f"fake_quantize: scale must be a real number or a real tensor, got "
                             f"{scale.dtype if torch.is_tensor(scale) else type(scale).__name__}")
        s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
        try:
            if torch.broadcast_shapes(s.shape, x.shape) != x.shape:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(
                f"fake_quantize: scale of shape {tuple(s.shape)} does not broadcast to x of shape {tuple(x.shape)}"
            ) from None
        if check_finite:
            if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
                raise ValueError("fake_quantize: scales must be finite and positive")
    return round_to_grid_(xf / s, fmt).mul_(s).to(dtype)


def token_fake_quantize(x: torch.Tensor, fmt: Format, gamma: float) -> torch.Tensor:
    """Dynamic per-token fake quantization: every row ``x_t`` along the last dim gets its own scale from
    α_t = γ·max|x_t| (all-zero rows: scale 1). Same shape and dtype as ``x``."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).to(torch.float32)
    s = torch.where(amax > 0, amax * (gamma / fmt.max_value), torch.ones_like(amax))
    return round_to_grid_(x.to(torch.float32) / s, fmt).mul_(s).to(x.dtype)


def block_fake_quantize(x: torch.Tensor, fmt: "str | Format", block_size: int,
                        scale_format: "str | Format | None") -> torch.Tensor:
    """Block-scaled fake quantization along the last dim (MX / NVFP4, see :func:`fake_quantize`); a last
    dim that is not a multiple of ``block_size`` is zero-padded for the scale computation (zeros do not
    change a block's max) and cut back. (The embedded model's width 144 is not a multiple of MX's 32.)"""
    d = x.shape[-1]
    pad = (-d) % block_size
    if pad == 0:
        return fake_quantize(x, fmt, block_size=block_size, scale_format=scale_format, check_finite=False)
    xp = F.pad(x, (0, pad))
    return fake_quantize(xp, fmt, block_size=block_size, scale_format=scale_format, check_finite=False)[..., :d]


def sqnr_db(x: torch.Tensor, x_q: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σx² / Σ(x - x_q)²)`` in dB (inf when exact)."""
    if x.shape != x_q.shape:
        raise ValueError(f"sqnr_db: shapes differ, {tuple(x.shape)} vs {tuple(x_q.shape)}")
    xd = x.detach().double()
    noise = (xd - x_q.detach().double()).pow(2).sum()
    signal = xd.pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(signal / noise))


def block_weight_scales(W: torch.Tensor, fmt, block_size: int, scale_format) -> torch.Tensor:
    """The block scales ``[out, ceil(in / block_size)]`` that :func:`block_fake_quantize` uses for ``W``
    (zero padding of the last block does not change a block's max, nor NVFP4's tensor scale)."""
    pad = (-W.shape[1]) % block_size
    Wp = F.pad(W.to(torch.float32), (0, pad)) if pad else W.to(torch.float32)
    xb = Wp.reshape(W.shape[0], Wp.shape[1] // block_size, block_size)
    return _block_scales(xb, parse_format(fmt), scale_format).squeeze(-1)
