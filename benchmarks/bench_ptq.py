"""Whole PTQ (``hqdit-w4a4``) of the embedded model at the ``book`` profile, and its packed 4-bit export.

1. PTQ = ``calibrate`` (book profile: 32 class-conditional trajectories in one batch, CFG 1.5, 25 DDPM
   steps, 10 recorded timesteps, 256 reservoir rows per timestep) + ``quantize_``, against the FP32
   sampling trajectories that calibration runs (same labels, seeds, steps, batch; no recording). Median of
   5 of each, timed round-robin (``--quick``: ``ci`` profile, 2 repeats). Target: total ≤ 1.5×.
2. The quantized layers packed by ``export.pack_quantized`` and written with ``export.save_packed``: bytes
   of the file on disk against FP32 (and FP16) bytes of the same layers, and the whole transformer
   (packed layers + everything else in FP32) against the whole FP32 / FP16 transformer. Target: packed
   layers ≤ 0.135× FP32.

    python -m benchmarks.bench_ptq [--quick] [--json out.json]
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from hqdit_utils.config import profile
from hqdit_utils.engine.export import pack_quantized, save_packed
from hqdit_utils.dit.models import load_dit
from hqdit_utils.engine.qlinear import QuantLinear

from ._dit import plain_trajectories_seconds, profile_protocol, timed_ptq
from ._report import check, finish, parser, setup


def export_sizes(qmodel, fp32_model) -> dict:
    """Bytes of the packed quantized layers on disk vs FP32/FP16 bytes of those layers and of the whole model."""
    layers, report = pack_quantized(qmodel)
    with tempfile.TemporaryDirectory() as tmp:
        on_disk = save_packed(layers, Path(tmp) / "packed.safetensors").stat().st_size
    names = set(layers)
    n_layer = sum(m.weight.numel() + (0 if m.bias is None else m.bias.numel())
                  for n, m in qmodel.named_modules() if n in names and isinstance(m, QuantLinear))
    n_weight = sum(p.shape[0] * p.shape[1] for p in layers.values())
    n_bias = n_layer - n_weight  # biases stay in floating point (not in the packed file)
    n_total = sum(p.numel() for p in fp32_model.parameters())
    rest = n_total - n_weight  # everything that is not a packed weight, kept in FP32
    return {"layers": len(layers), "weights": n_weight, "packed_file_bytes": on_disk,
            "layers_fp32_bytes": 4 * n_weight, "layers_fp16_bytes": 2 * n_weight,
            "model_params": n_total, "model_fp32_bytes": 4 * n_total, "model_fp16_bytes": 2 * n_total,
            "model_packed_bytes": on_disk + 4 * rest, "biases_kept_fp32": n_bias,
            "max_rel_change_fp16_scales": float(report["max rel. change"].max())}


def main(argv=None) -> list[dict]:
    args = parser(__doc__.split("\n")[0]).parse_args(argv)
    setup(args)
    prof = profile("ci" if args.quick else "book")
    repeats = 2 if args.quick else 5
    proto = profile_protocol(prof)
    bundle = load_dit("embedded")
    base, cal, qnt = [], [], []
    q = None
    for _ in range(repeats):  # round-robin: baseline, then one whole PTQ
        base.append(plain_trajectories_seconds(bundle, proto))
        q, t_cal, t_q, _ = timed_ptq(bundle, "hqdit-w4a4", proto)
        cal.append(t_cal)
        qnt.append(t_q)
    med = lambda v: float(torch.tensor(v).median())  # noqa: E731  (lower median for even counts)
    t_base, t_cal, t_q = med(base), med(cal), med(qnt)
    tot = med([a + b for a, b in zip(cal, qnt)])
    print(f"hqdit-w4a4 whole PTQ of the embedded model, profile {prof.name!r} ({proto}), "
          f"{torch.get_num_threads()} thread(s), median of {repeats}")
    print(f"  FP32 calibration trajectories (baseline): {t_base:7.2f} s")
    print(f"  calibrate:                                {t_cal:7.2f} s  ({t_cal / t_base:.2f}x)")
    print(f"  quantize_:                                {t_q:7.2f} s  ({t_q / t_base:.2f}x)")
    print(f"  total PTQ:                                {tot:7.2f} s  ({tot / t_base:.2f}x)")
    s = export_sizes(q, bundle.transformer)
    print(f"\nPacked export of the {s['layers']} quantized layers ({s['weights']:,} weights): file "
          f"{s['packed_file_bytes']:,} B = {s['packed_file_bytes'] / s['layers_fp32_bytes']:.4f}x FP32 "
          f"({s['layers_fp32_bytes']:,} B), {s['packed_file_bytes'] / s['layers_fp16_bytes']:.4f}x FP16")
    print(f"whole transformer ({s['model_params']:,} parameters; packed layers + the rest in FP32): "
          f"{s['model_packed_bytes']:,} B = {s['model_packed_bytes'] / s['model_fp32_bytes']:.3f}x FP32, "
          f"{s['model_packed_bytes'] / s['model_fp16_bytes']:.3f}x FP16")
    checks = [
        check("ptq", f"embedded whole PTQ hqdit-w4a4 ({prof.name})", "FP32 calibration forwards", tot / t_base,
              1.5, tot),
        check("ptq", "  of which quantize_", "FP32 calibration forwards", t_q / t_base, None, t_q),
        check("export", "packed hqdit-w4a4 layers (file on disk)", "FP32 bytes of the same layers",
              s["packed_file_bytes"] / s["layers_fp32_bytes"], 0.135, s["packed_file_bytes"], "B"),
        check("export", "whole transformer, packed layers + FP32 rest", "whole FP32 transformer",
              s["model_packed_bytes"] / s["model_fp32_bytes"], None, s["model_packed_bytes"], "B"),
    ]
    finish(args, "ptq", checks, {"profile": prof.name, "protocol": proto, "repeats": repeats,
                                 "baseline_s": base, "calibrate_s": cal, "quantize_s": qnt, "export": s})
    return checks


if __name__ == "__main__":
    main()
