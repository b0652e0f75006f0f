"""One denoiser forward of the embedded model (batch 64), FP32 against three quantized recipes.

Each quantized copy is built with ``quantize_`` from a small (``ci``-profile) calibration — the cost of a
forward does not depend on how well the recipe was calibrated. Medians of 7 forwards (``--quick``: 3)
after one warm-up, all in one process. Targets (issue 9): ``fp4-hybrid`` ≤ 1.3× FP32, ``hqdit-w4a4``
(online rotation) ≤ 1.6× FP32; ``int4-rtn`` reported.

    python -m benchmarks.bench_forward [--quick] [--json out.json]
"""
from __future__ import annotations

import torch

from hqdit_utils.engine.calibration import calibrate
from hqdit_utils.dit.models import load_dit

from ._dit import FORWARD_TARGETS, denoiser_inputs, forward_medians, quantized_copy
from ._report import check, finish, parser, setup


def main(argv=None) -> list[dict]:
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args(argv)
    setup(args)
    repeats = 3 if args.quick else 7
    bundle = load_dit("embedded")
    inputs = denoiser_inputs(bundle, args.batch)
    calib = calibrate(bundle, profile="ci")
    models = {"fp32": bundle.transformer}
    for recipe in FORWARD_TARGETS:
        models[recipe], _ = quantized_copy(bundle.transformer, recipe, calib)
    t = forward_medians(models, inputs, repeats)
    print(f"embedded model, batch {args.batch}, {torch.get_num_threads()} thread(s), median of {repeats} "
          "(models timed round-robin)")
    print(f"{'model':14s} {'ms':>8s} {'x FP32':>7s}")
    for name, sec in t.items():
        print(f"{name:14s} {sec * 1e3:8.1f} {sec / t['fp32']:7.3f}")
    checks = [check("forward", f"embedded forward b{args.batch} {recipe}", "FP32 forward", t[recipe] / t["fp32"],
                    target, t[recipe]) for recipe, target in FORWARD_TARGETS.items()]
    details = {"batch": args.batch, "repeats": repeats, "seconds": t}
    finish(args, "forward", checks, details)
    return checks


if __name__ == "__main__":
    main()
