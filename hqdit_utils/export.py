"""Real low-bit storage: encode fake-quantized weights as 4-bit codes, two per byte, plus their scales.

Fake quantization (``quantizer.py``) keeps every weight in float32 so that accuracy can be simulated on
any machine. This module shows the storage that the simulation stands for, and measures it:

* :func:`encode` maps grid values to their bit patterns — sign-magnitude ``S.E…E.M…M`` for a float
  format (for ``fp4_e2m1`` exactly the OCP FP4 / ``torch.float4_e2m1fn_x2`` layout), two's complement
  for a signed integer format;
* :func:`pack_nibbles` puts two 4-bit codes in one byte (element ``2i`` in the low nibble);
* :func:`save_packed` / :func:`load_packed` write and read a safetensors file holding, per layer, the
  packed codes, one float16 scale per output row and the format name in the metadata;
* :func:`storage_report` compares the packed size with FP32 and FP16 storage of the same layers.

No FP4 floating-point arithmetic happens in the project (FP4 matrix products need NVIDIA sm100+); the codes
are decoded back to float32 to compute, or — every FP4 grid being a small integer grid after one power-of-two
factor — multiplied exactly as int8 on the CPU by ``lowbit.py``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_path
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


def pack_weight(weight_q: torch.Tensor, scale: torch.Tensor, fmt: "str | Format") -> PackedWeight:
    """Pack a fake-quantized weight ``weight_q`` [out, in] = codes · ``scale`` [out, 1] (per output row).

    The scale is stored in float16; the codes are checked to reproduce ``weight_q`` with that stored
    scale, so the packed layer is exactly the layer that was simulated.
    """
    fmt = parse_format(fmt)
    if weight_q.dim() != 2:
        raise ValueError(f"pack_weight: expected a 2-D weight [out, in], got shape {tuple(weight_q.shape)}")
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1, 1).expand(weight_q.shape[0], 1)
    s16 = scale.to(torch.float16)
    if not torch.equal(s16.to(torch.float32), scale):
        raise ValueError("pack_weight: scales must be exactly representable in float16 (quantize them first)")
    codes = encode(weight_q.to(torch.float32) / scale, fmt)
    if fmt.bits <= 4:
        codes = pack_nibbles(codes)
    return PackedWeight(codes.contiguous(), s16.contiguous(), str(fmt), tuple(weight_q.shape))


def unpack_weight(p: PackedWeight) -> torch.Tensor:
    """float32 [out, in] weight of a :class:`PackedWeight`."""
    fmt = parse_format(p.fmt)
    codes = unpack_nibbles(p.codes) if fmt.bits <= 4 else p.codes
    return decode(codes, fmt) * p.scale.to(torch.float32)


def save_packed(layers: "dict[str, PackedWeight] | torch.nn.Module", path: "str | os.PathLike") -> Path:
    """Write packed layers to one safetensors file (atomically: temporary file, then rename). A quantized model
    is packed directly: the codes of its integer-path layers (:func:`hqdit_utils.lowbit.packed_weights`)."""
    if isinstance(layers, torch.nn.Module):
        from .lowbit import packed_weights

        layers = packed_weights(layers)
    path = Path(path)
    tensors, meta = {}, {}
    for name, p in layers.items():
        tensors[f"{name}.codes"] = p.codes
        tensors[f"{name}.scale"] = p.scale
        meta[name] = {"fmt": p.fmt, "shape": list(p.shape)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"hqdit_packed": json.dumps(meta)})
    return path


def load_packed(path: "str | os.PathLike") -> "dict[str, PackedWeight]":
    """Read a file written by :func:`save_packed`."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("hqdit_packed")
        if raw is None:
            raise ValueError(f"{path} is not a packed-weights file written by hqdit_utils.export.save_packed")
        meta = json.loads(raw)
        return {name: PackedWeight(f.get_tensor(f"{name}.codes"), f.get_tensor(f"{name}.scale"), m["fmt"],
                                   tuple(m["shape"])) for name, m in meta.items()}


def storage_report(layers: "dict[str, PackedWeight]") -> pd.DataFrame:
    """Bytes of the packed layers against FP32 and FP16 storage of the same weights, per format."""
    rows = {}
    for p in layers.values():
        r = rows.setdefault(p.fmt, {"layers": 0, "parameters": 0, "packed bytes": 0})
        r["layers"] += 1
        r["parameters"] += p.shape[0] * p.shape[1]
        r["packed bytes"] += p.nbytes
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.loc["total"] = df.sum()
    df["fp32 bytes"] = 4 * df["parameters"]
    df["fp16 bytes"] = 2 * df["parameters"]
    df["packed / fp32"] = df["packed bytes"] / df["fp32 bytes"]
    df["packed / fp16"] = df["packed bytes"] / df["fp16 bytes"]
    return df
