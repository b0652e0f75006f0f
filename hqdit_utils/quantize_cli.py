"""``hqdit quantize --recipe NAME [--model SOURCE] --out DIR``: calibrate, quantize, save state and plan.

Writes into ``DIR``: ``quant_state.safetensors`` + ``quant_config.json`` + ``packed_weights.safetensors`` (the
weights of the layers that run on the exact integer path as 4-bit codes two per byte; ``--float-weights``
keeps float tensors instead) (reload with
:func:`~hqdit_utils.qmodel.load_quantized` into a fresh ``load_dit(SOURCE).transformer``), ``plan.json``
(the :class:`~hqdit_utils.format_select.FormatPlan`), ``report.csv`` (per-layer formats, α, SQNR) and
``run.json`` (recipe, calibration protocol, wall times, peak memory).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from .calibration import calibrate
from .models import load_dit
from .qmodel import quantize_, save_quantized
from .recipes import RECIPES, get_recipe


def _peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2 ** 20


def run(recipe_name: str, out: str | Path, *, model: str = "embedded", trajectories: int | None = None,
        timesteps: int | None = None, steps: int | None = None, cfg_scale: float = 1.5, seed: int = 0,
        rows_per_timestep: int = 256, batch_size: int | None = None, profile: str | None = None,
        packed: bool = True) -> dict:
    """The command's work as a function (returns the ``run.json`` content)."""
    recipe = get_recipe(recipe_name)  # fail fast on an unknown name
    t0 = time.perf_counter()
    bundle = load_dit(model)
    calib = None
    if recipe.needs_calibration:
        calib = calibrate(bundle, layers=recipe.layers, exclude=recipe.exclude, num_trajectories=trajectories,
                          num_timesteps=timesteps, num_steps=steps, cfg_scale=cfg_scale, seed=seed,
                          batch_size=batch_size, rows_per_timestep=rows_per_timestep,
                          attention=recipe.quantize_attention, profile=profile)
    t1 = time.perf_counter()
    report = quantize_(bundle.transformer, recipe, calib)
    t2 = time.perf_counter()
    out = Path(out)
    save_quantized(bundle.transformer, out, report, packed=packed)
    info = {"recipe": recipe.name, "model": str(model), "bundle": bundle.name,
            "calibration": None if calib is None else calib.meta, "calibration_bytes": None if calib is None
            else calib.nbytes(), "seconds_calibration": t1 - t0, "seconds_quantize": t2 - t1,
            "peak_rss_mb": _peak_rss_mb(), "summary": report.summary()}
    (out / "run.json").write_text(json.dumps(info, indent=1, default=str))
    return info


def _cmd(args: argparse.Namespace) -> int:
    if args.list:
        for name in sorted(RECIPES):
            print(f"{name:22s} {RECIPES[name].description}")
        return 0
    if not args.recipe or not args.out:
        print("hqdit quantize: --recipe and --out are required (or --list)", file=sys.stderr)
        return 2
    try:
        info = run(args.recipe, args.out, model=args.model, trajectories=args.trajectories,
                   timesteps=args.timesteps, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed,
                   rows_per_timestep=args.rows_per_timestep, batch_size=args.batch_size,
                   packed=not args.float_weights)
    except KeyError as err:  # unknown recipe: the message lists the names
        print(f"hqdit quantize: {err.args[0]}", file=sys.stderr)
        return 2
    s = info["summary"]
    print(f"{s['recipe']}: {s['layers']} layers, mean SQNR weight {s['weight_sqnr']:.2f} dB, activation "
          f"{s['act_sqnr']:.2f} dB, layer output {s['output_sqnr']:.2f} dB; weight formats {s['weight_formats']}, "
          f"activation formats {s['act_formats']} -> {args.out}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("quantize", help="calibrate and quantize a DiT with a named recipe; save state + plan",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="recipe name (see --list)")
    p.add_argument("--model", default="embedded", help="model source for load_dit (default: embedded)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--trajectories", type=int, default=None, help="calibration trajectories (default: profile)")
    p.add_argument("--timesteps", type=int, default=None, help="calibration timesteps (default: profile)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps of the trajectories (default: profile)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows-per-timestep", type=int, default=256, help="reservoir rows per layer input and timestep")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--float-weights", action="store_true",
                   help="save float (fake-quantized) weights instead of packed 4-bit codes")
    p.set_defaults(func=_cmd)
    return p
