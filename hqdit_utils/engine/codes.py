"""Bit patterns of the low-bit formats: every value of a grid ↔ its uint8 code, two 4-bit codes per byte; a
per-row quantized weight as grid values × row scales, and the one route from those to a :class:`PackedWeight`.

The one codec that real storage (:mod:`hqdit_utils.engine.export`) and the integer execution path
(:mod:`hqdit_utils.engine.lowbit`) share. Codes are sign-magnitude for float formats (sign bit above exponent and
mantissa, as OCP's FP4/FP8) and two's complement for signed integers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import FloatFormat, Format, IntFormat, parse_format
from .quantizer import round_to_grid


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
    """One layer's weight in real low-bit storage: ``weight[j] = decode(codes[j]) · scale[j]``.

    codes: uint8 [out, in/2] (4-bit formats) or [out, in] (5–8-bit formats); scale: float32 [out, 1] in units of
    the format's grid (files written before float32 scales hold float16 ones: read the same way);
    fmt: format name; shape: the weight's [out, in].
    """

    codes: torch.Tensor
    scale: torch.Tensor
    fmt: str
    shape: tuple

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()


def row_grid_values(weight: torch.Tensor, fmt: "str | Format") -> tuple[torch.Tensor, torch.Tensor]:
    """Decompose a per-row fake-quantized weight [out, in] into float32 values on ``fmt``'s grid (unit scale)
    [out, in] and float32 row scales [out]: the one decomposition of the package (the integer path's codes are
    these values × the grid's power-of-two multiplier, :func:`hqdit_utils.engine.lowbit.weight_codes`).

    ``values[j] · scale[j]`` reproduces ``weight[j]`` to within 4 ulps of the weight's dtype (the simulated weight
    is the *rounded* product of a grid value and a float32 scale). Per row, the scale is ``max|w| / g`` for the
    first positive grid value ``g`` (largest first) that puts every ``w / scale`` on the grid; all-zero rows get 1.

    Raises:
        ValueError: a weight that is not 2-D, or a row that is not a scaled copy of the grid (block scales, a weight
            cast to a lower precision after quantization, an unquantized weight …); the message names the row.
    """
    fmt = parse_format(fmt)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    tol = 4 * torch.finfo(weight.dtype).eps
    amax = w.abs().amax(dim=1)
    scale = torch.ones_like(amax)
    values = torch.zeros(w.shape, dtype=torch.float32)
    todo = amax > 0
    grid = fmt.grid()
    for level in grid[grid > 0].flip(0).tolist():
        rows = todo.nonzero().flatten()
        if len(rows) == 0:
            break
        s = amax[rows] / level
        wr = w[rows]
        v = round_to_grid(wr / s[:, None], fmt)
        good = ((v * s[:, None] - wr).abs() <= tol * wr.abs()).all(dim=1)
        hit = rows[good]
        scale[hit] = s[good]
        values[hit] = v[good]
        todo[hit] = False
    if bool(todo.any()):
        bad = int(todo.nonzero()[0])
        raise ValueError(f"weight row {bad} is not {fmt} grid values × a per-row scale in {weight.dtype}")
    return values, scale


def pack_rows(values: torch.Tensor, scale: torch.Tensor, fmt: "str | Format") -> PackedWeight:
    """The one route to a :class:`PackedWeight`: ``values`` [out, in] on ``fmt``'s grid (unit scale, as
    :func:`row_grid_values` gives them), ``scale`` [out] (or [out, 1]) kept in float32, so the stored weight is
    ``values · scale`` as computed in float32. 4-bit codes go two per byte (``in`` must be even).

    Raises:
        ValueError: values off the grid, an odd ``in`` for a 4-bit format, or a scale that is not one per row.
    """
    fmt = parse_format(fmt)
    if values.dim() != 2 or scale.numel() != values.shape[0]:
        raise ValueError(f"pack_rows: values [out, in] and one scale per row, got {tuple(values.shape)} and "
                         f"{tuple(scale.shape)}")
    codes = encode(values, fmt)
    if fmt.bits <= 4:
        codes = pack_nibbles(codes)
    return PackedWeight(codes.contiguous(), scale.to(torch.float32).reshape(-1, 1).contiguous(), str(fmt),
                        tuple(values.shape))
