"""What a quantized DiT weighs: real packed storage of a fake-quantized model, and DiT-XL/2 memory scenarios.

* :func:`pack_quantized` — every channel-granular ``QuantLinear`` of a quantized transformer as a
  :class:`~hqdit_utils.export.PackedWeight` (4-bit codes two per byte, one float16 scale per output row).
  The fake-quantized weight stores only ``codes · scale``; the per-row scale is recovered exactly from
  the weight itself, then rounded to float16 for storage, so the stored layer differs from the simulated
  one by at most that rounding (reported per layer as ``max rel. change``).
* :func:`block_format_bits` — bits per weight of block-scaled formats (MXFP4, NVFP4), computed from
  their definitions (``export.py`` packs per-row scales only).
* :func:`dit_parameter_groups` / :func:`memory_scenarios` — DiT-XL/2's parameters by kind, counted from
  the original DiT architecture, and the FP32-relative memory of several "what is counted" scenarios.
"""
from __future__ import annotations

import pandas as pd
import torch

__all__ = ["recover_row_scales", "pack_quantized", "block_format_bits", "dit_parameter_groups",
           "memory_scenarios", "sd_vae_parameters"]


def recover_row_scales(weight_q: torch.Tensor, fmt, tol: float = 1e-5) -> torch.Tensor:
    """Per-row scales ``s`` [out, 1] with ``weight_q / s`` on ``fmt``'s grid (``ValueError`` if none exists).

    The row's largest magnitude sits on some grid value ``g``; every candidate ``max|w| / g`` is tried,
    the largest ``g`` first (the natural scale, where the row's maximum is the grid's maximum)."""
    from .formats import parse_format
    from .quantizer import round_to_grid

    fmt = parse_format(fmt)
    grid = fmt.grid().double()
    pos = grid[grid > 0].flip(0)  # descending
    w = weight_q.detach().double()
    m = w.abs().amax(dim=1, keepdim=True)
    scales = torch.ones_like(m)
    done = m.squeeze(1) == 0
    for g in pos:
        s = (m / g).clamp_min(1e-300)
        r = w / s
        err = (round_to_grid(r.float(), fmt).double() - r).abs().amax(dim=1)
        ok = (err <= tol * float(pos[0])) & ~done
        scales[ok] = s[ok]
        done |= ok
        if bool(done.all()):
            break
    if not bool(done.all()):
        bad = int((~done).nonzero()[0])
        raise ValueError(f"row {bad} of the weight is not a scaled copy of the {fmt} grid")
    return scales.float()


def pack_quantized(model) -> tuple[dict, pd.DataFrame]:
    """Pack every ``QuantLinear`` with a per-channel weight format of ≤ 8 bits.

    Returns ``(layers, report)``: ``layers`` maps module name → :class:`~hqdit_utils.export.PackedWeight`
    (save with ``export.save_packed``); ``report`` has one row per layer: format, shape, packed bytes and
    the largest relative change of a weight caused by storing its row scale in float16. Layers with block
    formats or unquantized weights are skipped (listed in ``report.attrs["skipped"]``).
    """
    from .export import pack_weight
    from .formats import parse_format
    from .qmodel import QuantLinear
    from .quantizer import round_to_grid

    layers, rows, skipped = {}, [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        fmt = parse_format(mod.weight_format)
        bits = getattr(fmt, "bits", 32)
        if mod.block_size or bits > 8:
            skipped.append(name)
            continue
        w = mod.weight.detach().float()
        s = recover_row_scales(w, fmt)
        codes_vals = round_to_grid(w / s, fmt)
        s16 = s.to(torch.float16).to(torch.float32)
        stored = codes_vals * s16
        p = pack_weight(stored, s16, fmt)
        layers[name] = p
        change = float(((stored - w).abs().amax(dim=1) / w.abs().amax(dim=1).clamp_min(1e-30)).max())
        rows.append({"layer": name, "format": str(fmt), "out": w.shape[0], "in": w.shape[1],
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


def memory_scenarios(groups: pd.Series | None = None, *, weight_bits: float = 4.0, scale_bits_per_row: int = 16,
                     hidden: int = 1152, vae_params: int | None = None) -> pd.DataFrame:
    """Bytes of DiT-XL/2 under several "what is quantized / what is counted" scenarios, vs FP32.

    ``weight_bits`` bits per quantized weight plus one ``scale_bits_per_row``-bit scale per output row
    (approximated as ``params / hidden`` rows). ``vae_params``: when given, scenarios that also count the
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
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=256)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"total": count(vae), "decoder": count(vae.decoder) + count(vae.post_quant_conv)}

