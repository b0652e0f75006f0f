"""The DiT-XL/2-shaped random model (28 blocks, width 1152, ~750 M parameters): capture memory, whole PTQ, forwards.

1. Calibration capture with a SMALL calibration set — 2 class-conditional trajectories in one batch of 2
   (CFG 1.5, so every forward sees batch 4), 2 DDPM steps, both recorded (2 timesteps), 256 reservoir rows
   per timestep — and the process's peak resident memory right after it (model weights included).
   Target ≤ 8 GB.
2. Whole PTQ (``hqdit-w4a4``, all 28 blocks) = that calibration + ``quantize_``, against the FP32 sampling
   trajectories the calibration runs (the same 2 forwards of batch 4, no recording). One run of each (an
   XL forward takes seconds). Reported (see 4. for the target).
3. One denoiser forward at batch 2: FP32 against ``int4-rtn``, ``fp4-hybrid`` and ``hqdit-w4a4`` (each
   quantized with the calibration of 1.; ``fp4-hybrid`` with a 10-point γ grid instead of 100 to save two
   minutes — the quantized model computes the same operations either way), medians of 5 timed
   round-robin, no warm-up call (an XL forward takes seconds; the first call was not slower in trials).
   Targets: ``fp4-hybrid`` ≤ 1.3×, ``hqdit-w4a4`` ≤ 1.6×. Needs memory for four copies of the model
   (~14 GB).

4. Whole PTQ (``hqdit-w4a4``) with a calibration set of the ``book`` profile's size — 32 trajectories in one
   batch (CFG 1.5: batch 64 per forward), 25 DDPM steps, 10 recorded timesteps, 256 reservoir rows per
   timestep — against the FP32 trajectories that calibration runs, on an XL-shaped model of ``--ptq-blocks``
   blocks (default 1: calibration forwards, recording and ``quantize_`` all grow linearly with the number of
   blocks, so the ratio does not depend on it; 28 blocks would take hours on one thread). One run of each.
   Target ≤ 3×. The PTQ of 2. has a calibration set too small for its ratio to say much; it is reported
   without a target.

``--quick``: 2 blocks instead of 28 and 2 repeats (the ratios are roughly independent of the depth); the
PTQ of 4. then uses the ``ci`` profile's calibration size.

    python -m benchmarks.bench_xl [--quick] [--json out.json]
"""
from __future__ import annotations

import time

import torch

from hqdit_utils.engine.calibration import calibrate
from hqdit_utils.config import profile
from hqdit_utils.dit.models import dit_xl2_shaped_random
from hqdit_utils.engine.recipes import get_recipe

from ._dit import (FORWARD_TARGETS, calibration_protocol, denoiser_inputs, forward_medians,
                   plain_trajectories_seconds, profile_protocol, quantized_copy, timed_ptq)
from ._report import check, finish, parser, peak_rss_gb, setup


def small_calibration(blocks: int, repeats: int) -> tuple[list[dict], dict]:
    """Sections 1.-3.: capture memory, small-calibration PTQ and forwards of a ``blocks``-block model."""
    t0 = time.perf_counter()
    bundle = dit_xl2_shaped_random(seed=0, num_layers=blocks)
    t_build = time.perf_counter() - t0
    rss_build = peak_rss_gb()
    proto = calibration_protocol(2, 2, 2, 2)
    t0 = time.perf_counter()
    calib = calibrate(bundle, seed=0, **proto)
    t_cal = time.perf_counter() - t0
    rss_cal = peak_rss_gb()
    t_base = plain_trajectories_seconds(bundle, proto)
    models = {"fp32": bundle.transformer}
    t_quant = {}
    for recipe in FORWARD_TARGETS:
        r = get_recipe(recipe)
        if recipe == "fp4-hybrid":
            r = r.replace(clip_grid=(10, 0.3, 1.0))
        models[recipe], t_quant[recipe] = quantized_copy(bundle.transformer, r, calib)
    t_ptq = t_cal + t_quant["hqdit-w4a4"]
    print(f"DiT-XL/2-shaped random model, {blocks} blocks, {torch.get_num_threads()} thread(s); built in "
          f"{t_build:.1f} s")
    print(f"calibration set: {proto} -> {len(calib.unique())} recorded inputs, {calib.nbytes() / 1e6:.0f} MB")
    print(f"  peak RSS after building the model {rss_build:.2f} GB, after calibration capture {rss_cal:.2f} GB")
    print(f"  FP32 calibration trajectories (baseline, 1 run): {t_base:7.1f} s")
    print(f"  calibrate:                                       {t_cal:7.1f} s  ({t_cal / t_base:.2f}x)")
    for recipe, sec in t_quant.items():
        note = " (10-point γ grid)" if recipe == "fp4-hybrid" else ""
        print(f"  quantize_ {recipe:12s}:                        {sec:7.1f} s  ({sec / t_base:.2f}x){note}")
    print(f"  whole PTQ hqdit-w4a4 (calibrate + quantize_):    {t_ptq:7.1f} s  ({t_ptq / t_base:.2f}x)")
    inputs = denoiser_inputs(bundle, 2)
    t = forward_medians(models, inputs, repeats, warmup=0)
    print(f"\nOne forward, batch 2, median of {repeats} (round-robin):")
    for name, sec in t.items():
        print(f"  {name:12s} {sec:7.2f} s  {sec / t['fp32']:6.3f}x")
    tag = f"XL-shaped ({blocks} blocks)"
    checks = [check("memory", f"{tag} calibration capture, peak RSS", "—", rss_cal / 8.0, 1.0, rss_cal, "GB",
                    note="ratio = peak GB / 8 GB (process peak, model weights included)"),
              check("ptq", f"{tag} whole PTQ hqdit-w4a4 (2 traj x 2 ts)", "FP32 calibration forwards",
                    t_ptq / t_base, None, t_ptq, note="one run; calibration too small for the ratio to mean much"),
              check("ptq", "  of which quantize_", "FP32 calibration forwards", t_quant["hqdit-w4a4"] / t_base,
                    None, t_quant["hqdit-w4a4"], note="one run")]
    checks += [check("forward", f"{tag} forward b2 {recipe}", "FP32 forward", t[recipe] / t["fp32"], target,
                     t[recipe]) for recipe, target in FORWARD_TARGETS.items()]
    return checks, {"blocks": blocks, "protocol": proto, "build_s": t_build, "rss_build_gb": rss_build,
                    "rss_calibration_gb": rss_cal, "calibration_mb": calib.nbytes() / 1e6, "baseline_s": t_base,
                    "calibrate_s": t_cal, "quantize_s": t_quant, "forward_s": t, "repeats": repeats}


def book_size_ptq(blocks: int, quick: bool) -> tuple[list[dict], dict]:
    """Section 4.: whole PTQ of ``hqdit-w4a4`` with a calibration set of the ``book`` profile's size (``ci``
    when ``quick``) on a ``blocks``-block XL-shaped model, against the FP32 trajectories it runs."""
    prof = profile("ci" if quick else "book")
    proto = profile_protocol(prof)
    bundle = dit_xl2_shaped_random(seed=0, num_layers=blocks)
    t_base = plain_trajectories_seconds(bundle, proto)
    _, t_cal, t_q, calib = timed_ptq(bundle, "hqdit-w4a4", proto)
    t_ptq = t_cal + t_q
    print(f"\nWhole PTQ at the {prof.name!r} profile's calibration size, {blocks}-block XL-shaped model: {proto}")
    print(f"  -> {len(calib.unique())} recorded inputs, {calib.nbytes() / 1e6:.0f} MB")
    print(f"  FP32 calibration trajectories (baseline, 1 run): {t_base:7.1f} s")
    print(f"  calibrate:                                       {t_cal:7.1f} s  ({t_cal / t_base:.2f}x)")
    print(f"  quantize_ hqdit-w4a4:                            {t_q:7.1f} s  ({t_q / t_base:.2f}x)")
    print(f"  whole PTQ:                                       {t_ptq:7.1f} s  ({t_ptq / t_base:.2f}x)")
    tag = f"XL-shaped ({blocks} blocks), {prof.name}-profile calibration"
    checks = [check("ptq", f"{tag}: whole PTQ hqdit-w4a4", "FP32 calibration forwards", t_ptq / t_base, 3.0,
                    t_ptq, note="one run"),
              check("ptq", "  of which calibrate (forwards + recording)", "FP32 calibration forwards",
                    t_cal / t_base, None, t_cal, note="one run"),
              check("ptq", "  of which quantize_", "FP32 calibration forwards", t_q / t_base, None, t_q,
                    note="one run")]
    return checks, {"blocks": blocks, "protocol": proto, "baseline_s": t_base, "calibrate_s": t_cal,
                    "quantize_s": t_q, "calibration_mb": calib.nbytes() / 1e6}


def main(argv=None) -> list[dict]:
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=None, help="number of blocks (default 28; --quick: 2)")
    ap.add_argument("--ptq-blocks", type=int, default=1, help="blocks of the model of the book-size PTQ (default 1)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["small", "book-ptq"],
                    help="sections to leave out: small = 1.-3., book-ptq = 4.")
    args = ap.parse_args(argv)
    setup(args)
    blocks = args.blocks or (2 if args.quick else 28)
    repeats = 2 if args.quick else 5
    checks, details = [], {}
    if "small" not in args.skip:
        c, details["small_calibration"] = small_calibration(blocks, repeats)
        checks += c
    if "book-ptq" not in args.skip:
        c, details["book_size_ptq"] = book_size_ptq(args.ptq_blocks, args.quick)
        checks += c
    finish(args, "xl", checks, details)
    return checks


if __name__ == "__main__":
    main()
