"""Bit patterns of the low-bit formats: every value of a grid ↔ its uint8 code, two 4-bit codes per byte.

The one codec that real storage (:mod:`hqdit_utils.engine.export`) and the integer execution path
(:mod:`hqdit_utils.engine.lowbit`) share. Codes are sign-magnitude for float formats (sign bit above exponent and
mantissa, as OCP's FP4/FP8) and two's complement for signed integers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import FloatFormat, Format, IntFormat, parse_format


def _float_codebook(fmt: FloatFormat) -> torch.Tensor:
    """Value of every non-negative code ``e·2^M + f`` (float64), in code order (increasing)."""
    if fmt.special != "none":
        raise ValueError(f"encode: only formats with no reserved codes can be packed, not {fmt}")
    beta, n_man = fmt.exponent_bias, 2 ** fmt.man_bits
    vals = [(2.0 ** (1 - beta)) * (f / n_man) if e == 0 and fmt.subnormals else
            0.0 if e == 0 else (2.0 ** (e - beta)) * (1 + f / n_man)
            for e in range(2 ** fmt.exp_bits) for f in range(n_man)]
    return torch.tensor(vals, dtype=torch.float64)


def encode(values: torch.Tensor, fmt: "str | Format") -> torch.Tensor:
    """Bit patterns (uint8, same shape) of ``values``, which must lie exactly on ``fmt``'s grid.

    Raises:
        ValueError: a value that is not on the grid (quantize first: ``round_to_grid(w / scale, fmt)``),
            or a format wider than 8 bits.
    """
    fmt = parse_format(fmt)
    if fmt.bits > 8:
        raise ValueError(f"encode: codes of {fmt} do not fit in a byte")
    v = values.detach().to(torch.float64)
    if isinstance(fmt, IntFormat):
        if not bool((v == v.round()).all()) or v.min() < fmt.min_value or v.max() > fmt.max_value:
            raise ValueError(f"encode: values are not on the {fmt} grid")
        mask = (1 << fmt.bits) - 1
        return (v.to(torch.int64) & mask).to(torch.uint8)
    if not isinstance(fmt, FloatFormat):
        raise ValueError(f"encode: cannot encode {fmt}")
    book = _float_codebook(fmt)
    mag = v.abs().flatten()
    idx = torch.searchsorted(book, mag).clamp_(max=len(book) - 1)
    if not bool((book[idx] == mag).all()):
        raise ValueError(f"encode: values are not on the {fmt} grid; quantize them first")
    sign = (torch.signbit(v.flatten()) & (mag > 0)).to(torch.int64) << (fmt.exp_bits + fmt.man_bits)
    return (sign | idx).reshape(values.shape).to(torch.uint8)


def decode(codes: torch.Tensor, fmt: "str | Format") -> torch.Tensor:
    """Inverse of :func:`encode`: float32 values of uint8 bit patterns."""
    fmt = parse_format(fmt)
    c = codes.to(torch.int64)
    if isinstance(fmt, IntFormat):
        if fmt.signed:
            c = torch.where(c >= 2 ** (fmt.bits - 1), c - 2 ** fmt.bits, c)
        return c.to(torch.float32)
    nbits = fmt.exp_bits + fmt.man_bits
    mag = _float_codebook(fmt)[c & ((1 << nbits) - 1)]
    return torch.where((c >> nbits) & 1 == 1, -mag, mag).to(torch.float32)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dimension (even length): ``[..., n] -> [..., n/2]``."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles: the last dimension must be even, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``[..., n/2] -> [..., n]`` uint8 codes."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


@dataclass(frozen=True)
class PackedWeight:
    """One layer's weight in real low-bit storage.

    codes: uint8 [out, in/2] (4-bit formats) or [out, in] (5–8-bit formats); scale: float16 [out, 1];
    fmt: format name; shape: the weight's [out, in].
    """

    codes: torch.Tensor
    scale: torch.Tensor
    fmt: str
    shape: tuple

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()
