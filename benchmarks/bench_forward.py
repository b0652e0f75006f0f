"""One denoiser forward of the embedded model (batch 64), FP32 against three quantized recipes.

Each quantized copy is built with ``quantize_`` from a small (``ci``-profile) calibration — the cost of a
forward does not depend on how well the recipe was calibrated. Medians of 7 forwards (``--quick``: 3)
after one warm-up, all in one process. Targets (issue 9): ``fp4-hybrid`` ≤ 1.3× FP32, ``hqdit-w4a4``
(online rotation) ≤ 1.6× FP32; ``int4-rtn`` reported. BF16 (the FP32 model under CPU bfloat16 autocast, what a
CPU user would run instead; issue 30) is timed beside them, and every ratio is also given against it.

Then (unless ``--no-compile``) it times ``torch.compile`` of the FP32 and the ``hqdit-w4a4`` models (issue 30's
targets: the compiled W4A4 model at least as fast as eager, and ≤ 0.8× the FP32 forward), and samples the book
profile's images with FP32, W4A4 eager and W4A4 compiled (target: W4A4 faster than FP32; the compilation is timed
apart and reported beside it).

    python -m benchmarks.bench_forward [--quick] [--no-compile] [--json out.json]
"""
from __future__ import annotations

import dataclasses
import time

import torch

from hqdit_utils.engine.calibration import calibrate
from hqdit_utils.dit.models import load_dit

from ._dit import FORWARD_TARGETS, Bf16Autocast, denoiser_inputs, forward_medians, quantized_copy
from ._report import check, cpu_line, finish, parser, setup


def _compiled(models: dict, inputs, repeats: int) -> dict:
    """``torch.compile`` of the FP32 and the ``hqdit-w4a4`` model: seconds of each first call (compilation
    included), then medians of the compiled models beside the eager ones and BF16, timed round-robin."""
    compiled, first = {}, {}
    x, t, y = inputs
    for name in ("fp32", "hqdit-w4a4"):
        compiled[name] = torch.compile(models[name], dynamic=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled[name](x, timestep=t, class_labels=y)
        first[name] = time.perf_counter() - t0
    med = forward_medians({"fp32": models["fp32"], "bf16": models["bf16"], "hqdit-w4a4": models["hqdit-w4a4"],
                           "fp32 compiled": compiled["fp32"], "hqdit-w4a4 compiled": compiled["hqdit-w4a4"]},
                          inputs, repeats)
    return {"first_s": first, "seconds": med}


def _sampling(bundle, q, quick: bool) -> dict:
    """Seconds to sample the book profile's images (its steps, batch, guidance; ``--quick``: a quarter of the
    images) with the FP32 model, the ``hqdit-w4a4`` model eager, and the same model compiled (its compilation
    timed apart, by a first call on one batch's shape)."""
    from hqdit_utils.config import profile
    from hqdit_utils.runs.experiments import sample_plan
    from hqdit_utils.dit.sampling import sample

    prof = profile("book")
    n = prof.eval_samples // (4 if quick else 1)
    labels, seeds = sample_plan(bundle.num_classes, n, 0)
    compiled = torch.compile(q, dynamic=False)
    xs = torch.randn(2 * min(prof.batch_size, n), bundle.latent_channels, bundle.latent_size, bundle.latent_size)
    t0 = time.perf_counter()
    with torch.no_grad():  # the shape of a guided batch: the compilation, once
        compiled(xs, timestep=torch.full((len(xs),), 500), class_labels=torch.zeros(len(xs), dtype=torch.long))
    compile_s = time.perf_counter() - t0
    out = {"images": n, "steps": prof.sampling_steps, "batch": prof.batch_size, "compile_s": compile_s}
    for name, model in (("fp32", bundle.transformer), ("hqdit-w4a4", q), ("hqdit-w4a4 compiled", compiled)):
        b = dataclasses.replace(bundle, transformer=model)
        t0 = time.perf_counter()
        with torch.no_grad():
            sample(b, labels, num_steps=prof.sampling_steps, cfg_scale=1.5, seeds=seeds,
                   batch_size=prof.batch_size, progress=False)
        out[name] = time.perf_counter() - t0
    return out


def main(argv=None) -> list[dict]:
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip torch.compile and the book-profile sampling (issue 30's targets; a few minutes)")
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
        details["compile"] = c = _compiled(models, inputs, repeats)
        m = c["seconds"]
        print(f"\ntorch.compile (first call: FP32 {c['first_s']['fp32']:.1f} s, hqdit-w4a4 "
              f"{c['first_s']['hqdit-w4a4']:.1f} s), then:")
        print(f"{'model':20s} {'ms':>8s} {'x FP32':>7s} {'x BF16':>7s}")
        for name, sec in m.items():
            print(f"{name:20s} {sec * 1e3:8.1f} {sec / m['fp32']:7.3f} {sec / m['bf16']:7.3f}")
        w = m["hqdit-w4a4 compiled"]
        checks += [check("forward", f"embedded forward b{args.batch} hqdit-w4a4 torch.compile", "eager",
                         w / m["hqdit-w4a4"], 1.0, w),
                   check("forward", f"embedded forward b{args.batch} hqdit-w4a4 torch.compile", "FP32 forward",
                         w / m["fp32"], 0.8, w),
                   check("forward", f"embedded forward b{args.batch} hqdit-w4a4 torch.compile", "BF16 forward",
                         w / m["bf16"], None, w),
                   check("forward", f"embedded forward b{args.batch} hqdit-w4a4 torch.compile", "FP32 compiled",
                         w / m["fp32 compiled"], None, w)]
        details["sampling"] = sm = _sampling(bundle, models["hqdit-w4a4"], args.quick)
        print(f"\nbook-profile sampling ({sm['images']} images, {sm['steps']} steps, batch {sm['batch']}, CFG): "
              f"FP32 {sm['fp32']:.1f} s, hqdit-w4a4 eager {sm['hqdit-w4a4']:.1f} s, compiled "
              f"{sm['hqdit-w4a4 compiled']:.1f} s (+ {sm['compile_s']:.1f} s compiling, once)")
        checks += [check("forward", "book-profile sampling hqdit-w4a4 eager", "FP32 sampling",
                         sm["hqdit-w4a4"] / sm["fp32"], 1.0, sm["hqdit-w4a4"]),
                   check("forward", "book-profile sampling hqdit-w4a4 torch.compile", "FP32 sampling",
                         sm["hqdit-w4a4 compiled"] / sm["fp32"], 1.0, sm["hqdit-w4a4 compiled"]),
                   check("forward", "book-profile sampling hqdit-w4a4 torch.compile incl. compiling", "FP32 sampling",
                         (sm["hqdit-w4a4 compiled"] + sm["compile_s"]) / sm["fp32"], None,
                         sm["hqdit-w4a4 compiled"] + sm["compile_s"])]
    finish(args, "forward", checks, details)
    return checks


if __name__ == "__main__":
    main()
