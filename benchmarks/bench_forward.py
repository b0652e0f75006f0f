"""One denoiser forward of the embedded model (batch 64), FP32 against three quantized recipes.

Each quantized copy is built with ``quantize_`` from a small (``ci``-profile) calibration — the cost of a
forward does not depend on how well the recipe was calibrated. Medians of 7 forwards (``--quick``: 3)
after one warm-up, all in one process. Targets (issue 9): ``fp4-hybrid`` ≤ 1.3× FP32, ``hqdit-w4a4``
(online rotation) ≤ 1.6× FP32; ``int4-rtn`` reported. BF16 (the FP32 model under CPU bfloat16 autocast, what a
CPU user would run instead; issue 30) is timed beside them, and every ratio is also given against it.

``--compile`` also times ``torch.compile`` of the ``hqdit-w4a4`` model against eager (target: at least as fast).

    python -m benchmarks.bench_forward [--quick] [--compile] [--json out.json]
"""
from __future__ import annotations

import torch

from hqdit_utils.engine.calibration import calibrate
from hqdit_utils.dit.models import load_dit

from ._dit import FORWARD_TARGETS, Bf16Autocast, denoiser_inputs, forward_medians, quantized_copy
from ._report import check, cpu_line, finish, parser, setup


def _compiled(model, inputs, repeats: int) -> dict:
    """Seconds of the first call of ``torch.compile(model)`` (compilation included) and medians of it and of
    ``model`` (eager) afterwards, timed round-robin."""
    import time

    compiled = torch.compile(model)
    x, t, y = inputs
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled(x, timestep=t, class_labels=y)
    first = time.perf_counter() - t0
    med = forward_medians({"eager": model, "compiled": compiled}, inputs, repeats)
    return {"first_s": first, "eager_s": med["eager"], "compiled_s": med["compiled"]}


def main(argv=None) -> list[dict]:
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile of the hqdit-w4a4 model against eager (issue 30; minutes)")
    args = ap.parse_args(argv)
    setup(args)
    repeats = 3 if args.quick else 7
    bundle = load_dit("embedded")
    inputs = denoiser_inputs(bundle, args.batch)
    calib = calibrate(bundle, profile="ci")
    models = {"fp32": bundle.transformer, "bf16": Bf16Autocast(bundle.transformer)}
    for recipe in FORWARD_TARGETS:
        models[recipe], _ = quantized_copy(bundle.transformer, recipe, calib)
    t = forward_medians(models, inputs, repeats)
    print(f"embedded model, batch {args.batch}, {torch.get_num_threads()} thread(s), median of {repeats} "
          "(models timed round-robin)")
    print(cpu_line())
    print(f"{'model':14s} {'ms':>8s} {'x FP32':>7s} {'x BF16':>7s}")
    for name, sec in t.items():
        print(f"{name:14s} {sec * 1e3:8.1f} {sec / t['fp32']:7.3f} {sec / t['bf16']:7.3f}")
    checks = [check("forward", f"embedded forward b{args.batch} {recipe}", "FP32 forward", t[recipe] / t["fp32"],
                    target, t[recipe]) for recipe, target in FORWARD_TARGETS.items()]
    checks += [check("forward", f"embedded forward b{args.batch} {name}", "BF16 forward", t[name] / t["bf16"],
                     None, t[name]) for name in ("fp32", *FORWARD_TARGETS)]
    details = {"batch": args.batch, "repeats": repeats, "seconds": t}
    if args.compile:
        details["compile"] = _compiled(models["hqdit-w4a4"], inputs, repeats)
        c = details["compile"]
        print(f"torch.compile of hqdit-w4a4 (integer path): first call {c['first_s']:.1f} s, then "
              f"{c['compiled_s'] * 1e3:.1f} ms against eager {c['eager_s'] * 1e3:.1f} ms "
              f"({c['compiled_s'] / c['eager_s']:.2f}x)")
        checks.append(check("forward", f"embedded forward b{args.batch} hqdit-w4a4 torch.compile", "eager",
                            c["compiled_s"] / c["eager_s"], 1.0, c["compiled_s"]))
    finish(args, "forward", checks, details)
    return checks


if __name__ == "__main__":
    main()
