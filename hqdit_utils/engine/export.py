"""Real low-bit storage: encode fake-quantized weights as 4-bit codes, two per byte, plus their scales;
and what a quantized DiT weighs.

Fake quantization (``quantizer.py``) keeps every weight in float32 so that accuracy can be simulated on
any machine. This module shows the storage that the simulation stands for, and measures it:

* :func:`encode` maps grid values to their bit patterns — sign-magnitude ``S.E…E.M…M`` for a float
  format (for ``fp4_e2m1`` exactly the OCP FP4 / ``torch.float4_e2m1fn_x2`` layout), two's complement
  for a signed integer format;
* :func:`pack_nibbles` puts two 4-bit codes in one byte (element ``2i`` in the low nibble);
* :func:`save_packed` / :func:`load_packed` write and read a safetensors file holding, per layer, the
  packed codes, one float32 scale per output row and the format name in the metadata (files written with
  float16 scales before read the same way);
* :func:`storage_report` compares the packed size with FP32 and FP16 storage of the same layers;
* :func:`pack_quantized` — every channel-granular ``QuantLinear`` of a quantized transformer as a
  :class:`PackedWeight`, by the package's one decomposition and one packing route
  (:func:`hqdit_utils.engine.lowbit.packed_weight`: the integer path's codes, or the per-row grid values ×
  float32 scales recovered from the fake-quantized weight); the stored layer reproduces the simulated one to
  within 4 float32 ulps (reported per layer as ``max rel. change``);
* :func:`block_format_bits` — bits per weight of block-scaled formats (MXFP4, NVFP4), computed from
  their definitions (this module packs per-row scales only);
* :func:`dit_parameter_groups` / :func:`memory_scenarios` — DiT-XL/2's parameters by kind, counted from
  the original DiT architecture, and the FP32-relative memory of several "what is counted" scenarios.

No FP4 floating-point arithmetic happens in the project (FP4 matrix products need NVIDIA sm100+); the codes
are decoded back to float32 to compute, or — every FP4 grid being a small integer grid after one power-of-two
factor — multiplied exactly as int8 on the CPU by ``lowbit.py``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..files import atomic_path
# encode / pack_nibbles / unpack_nibbles are this module's storage API too (re-exported from codes)
from .codes import PackedWeight, decode, encode, pack_nibbles, unpack_nibbles  # noqa: F401
from .formats import parse_format
from .lowbit import packed_weight, packed_weights
from .qlinear import QuantLinear


def unpack_weight(p: PackedWeight) -> torch.Tensor:
    """float32 [out, in] weight of a :class:`PackedWeight`."""
    fmt = parse_format(p.fmt)
    codes = unpack_nibbles(p.codes) if fmt.bits <= 4 else p.codes
    return decode(codes, fmt) * p.scale.to(torch.float32)


def save_packed(layers: "dict[str, PackedWeight] | torch.nn.Module", path: "str | os.PathLike") -> Path:
    """Write packed layers to one safetensors file (atomically: temporary file, then rename). A quantized model
    is packed directly: the codes of its integer-path layers (:func:`hqdit_utils.engine.lowbit.packed_weights`)."""
    if isinstance(layers, torch.nn.Module):
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
            raise ValueError(f"{path} is not a packed-weights file written by hqdit_utils.engine.export.save_packed")
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


# --------------------------------------------------------------------------------------------------
# What a quantized DiT weighs
# --------------------------------------------------------------------------------------------------
def pack_quantized(model) -> tuple[dict, pd.DataFrame]:
    """Pack every ``QuantLinear`` with a per-channel weight format of ≤ 8 bits
    (:func:`hqdit_utils.engine.lowbit.packed_weight`: float32 row scales).

    Returns ``(layers, report)``: ``layers`` maps module name → :class:`PackedWeight`
    (save with :func:`save_packed`); ``report`` has one row per layer: format, shape, packed bytes and
    the largest relative change of a weight row's values between the packed and the simulated weight (within
    4 float32 ulps by construction). Layers with block formats, unquantized weights or (4-bit) an odd
    ``in_features`` are skipped (listed in ``report.attrs["skipped"]``).
    """
    layers, rows, skipped = {}, [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        bits = getattr(parse_format(mod.weight_format), "bits", 32)
        if mod.block_size or bits > 8 or (bits <= 4 and mod.in_features % 2):
            skipped.append(name)
            continue
        p = packed_weight(mod)
        # a reloaded packed model holds codes only: its weight is the integer state's codes · row scale
        w = (mod.weight if mod.weight is not None else mod.lowbit.float_weight()).detach().float()
        stored = unpack_weight(p)
        layers[name] = p
        change = float(((stored - w).abs().amax(dim=1) / w.abs().amax(dim=1).clamp_min(1e-30)).max())
        rows.append({"layer": name, "format": p.fmt, "out": w.shape[0], "in": w.shape[1],
                     "packed bytes": p.nbytes, "fp32 bytes": 4 * w.numel(), "max rel. change": change})
    report = pd.DataFrame(rows).set_index("layer") if rows else pd.DataFrame()
    report.attrs["skipped"] = skipped
    return layers, report


def block_format_bits(element_bits: int = 4, block: int = 32, scale_bits: int = 8) -> float:
    """Bits per weight of a block-scaled format: ``element_bits + scale_bits / block``.

    MXFP4 (OCP MX): 4-bit E2M1 elements, one 8-bit E8M0 scale per 32 → 4.25 bits. NVFP4: 4-bit E2M1,
    one 8-bit FP8-E4M3 scale per 16 → 4.5 bits (plus one FP32 scale per tensor, negligible)."""
    return element_bits + scale_bits / block


def dit_parameter_groups(hidden: int = 1152, depth: int = 28, mlp_ratio: int = 4, patch: int = 2,
                         in_channels: int = 4, learn_sigma: bool = True, num_classes: int = 1000,
                         freq_dim: int = 256) -> pd.Series:
    """Parameter counts of the original DiT (Peebles & Xie) by kind; the defaults are DiT-XL/2-256.

    Counted from the architecture of ``models.py`` of github.com/facebookresearch/DiT (weights + biases;
    the fixed sin-cos positional table is a buffer, not a parameter; one class-embedding row for CFG's
    null class).
    """
    out_ch = in_channels * (2 if learn_sigma else 1)
    mlp = hidden * mlp_ratio
    lin = lambda i, o: i * o + o  # noqa: E731
    per_block = {
        "block linears (qkv, proj, fc1, fc2)": lin(hidden, 3 * hidden) + lin(hidden, hidden) + lin(hidden, mlp) + lin(mlp, hidden),
        "adaLN modulation linears": lin(hidden, 6 * hidden),
    }
    groups = {k: depth * v for k, v in per_block.items()}
    groups["embedders (patch, timestep, class)"] = (in_channels * patch * patch * hidden + hidden
                                                    + lin(freq_dim, hidden) + lin(hidden, hidden)
                                                    + (num_classes + 1) * hidden)
    groups["final layer"] = lin(hidden, 2 * hidden) + lin(hidden, patch * patch * out_ch)
    return pd.Series(groups, name="parameters")


def memory_scenarios(groups: pd.Series | None = None, *, weight_bits: float = 4.0, scale_bits_per_row: int = 32,
                     hidden: int = 1152, vae_params: int | None = None) -> pd.DataFrame:
    """Bytes of DiT-XL/2 under several "what is quantized / what is counted" scenarios, vs FP32.

    ``weight_bits`` bits per quantized weight plus one ``scale_bits_per_row``-bit scale per output row
    (approximated as ``params / hidden`` rows; 32: the float32 row scale :func:`save_packed` stores). ``vae_params``: when given, scenarios that also count the
    VAE (kept in FP32) are added.
    """
    g = dit_parameter_groups() if groups is None else groups
    lin4 = "block linears (qkv, proj, fc1, fc2)"
    ada = "adaLN modulation linears"
    total = int(g.sum())
    q_bytes = lambda n: n * weight_bits / 8 + (n / hidden) * scale_bits_per_row / 8  # noqa: E731
    fp32 = lambda n: 4 * n  # noqa: E731
    rows = {
        "all weights 4-bit (nothing kept in FP32)": q_bytes(total),
        "block linears + adaLN 4-bit, rest FP32": q_bytes(g[lin4] + g[ada]) + fp32(total - g[lin4] - g[ada]),
        "block linears 4-bit, rest FP32 (our default layer set)": q_bytes(g[lin4]) + fp32(total - g[lin4]),
    }
    base = {k: 4 * total for k in rows}
    if vae_params:
        rows["block linears 4-bit, rest FP32, + FP32 VAE counted"] = q_bytes(g[lin4]) + fp32(total - g[lin4]) + fp32(vae_params)
        base["block linears 4-bit, rest FP32, + FP32 VAE counted"] = 4 * (total + vae_params)
        rows["block linears + adaLN 4-bit, rest FP32, + FP32 VAE counted"] = (
            q_bytes(g[lin4] + g[ada]) + fp32(total - g[lin4] - g[ada]) + fp32(vae_params))
        base["block linears + adaLN 4-bit, rest FP32, + FP32 VAE counted"] = 4 * (total + vae_params)
    df = pd.DataFrame({"FP32 MB": pd.Series(base) / 1e6, "quantized MB": pd.Series(rows) / 1e6})
    df["reduction vs FP32"] = df["FP32 MB"] / df["quantized MB"]
    return df


def sd_vae_parameters() -> dict:
    """Parameter counts of the SD-VAE (``AutoencoderKL`` with Stable Diffusion's config, as
    ``stabilityai/sd-vae-ft-ema``), built with random weights on the meta device (nothing downloaded)."""
    from diffusers import AutoencoderKL  # deferred: diffusers takes seconds to import

    with torch.device("meta"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=256)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"total": count(vae), "decoder": count(vae.decoder) + count(vae.post_quant_conv)}

