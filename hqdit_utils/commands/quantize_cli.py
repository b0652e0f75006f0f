"""``hqdit quantize --recipe NAME [--model SOURCE] --out DIR``: calibrate, quantize, save state and plan.

Writes into ``DIR``: ``quant_state.safetensors`` + ``quant_config.json`` + ``packed_weights.safetensors`` (the
weights of the layers that run on the exact integer path as 4-bit codes two per byte; ``--float-weights``
keeps float tensors instead), ``plan.json`` (the :class:`~hqdit_utils.engine.format_select.FormatPlan`),
``report.csv`` (per-layer formats, α, SQNR), ``run.json`` (recipe, the model source, calibration
protocol, wall times, peak memory) and ``MANIFEST.json`` (sha256 and size of every other file, checked on
every load), written last. ``hqdit sample --quantized DIR`` samples from it (reload
in Python with :func:`~hqdit_utils.engine.qmodel.load_quantized` into a fresh ``load_dit(SOURCE).transformer``).

The model is ``--model``, else ``$HQDIT_DIT_WEIGHTS``, else the embedded model. Each stage (load,
calibrate, quantize, save) prints one line with its wall time on stderr. A non-empty ``DIR`` is refused
unless ``--force`` is given.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import warnings
from pathlib import Path

from ..engine.calibration import calibrate
from .cli_common import CliError, load_model, one_line, require_device
from ..runs.experiments import quantized_copy
from ..files import write_json_atomic, write_manifest
from ..engine.hadamard import is_supported
from ..engine.qmodel import check_rotation, folder_tag, load_quantized, save_quantized
from ..engine.recipes import RECIPES, QuantRecipe, get_recipe

#: The file ``hqdit quantize`` writes last; ``hqdit sample --quantized`` reads the model source from it.
RUN_FILE = "run.json"


def _peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2 ** 20


def with_rotation_block(recipe: QuantRecipe, block: int) -> QuantRecipe:
    """``recipe`` rotated in Hadamard blocks of ``block`` (named ``<recipe>-rb<block>``); :class:`CliError`
    for a recipe without rotation or a block size with no Hadamard construction."""
    if not recipe.rotation:
        raise CliError(f"recipe {recipe.name} has no Hadamard rotation, so --rotation-block does not apply "
                       "(drop the flag or choose a rotated recipe, e.g. hqdit-w4a4)")
    if not is_supported(block):
        raise CliError(f"--rotation-block {block}: no Hadamard matrix of that order can be built here "
                       "(use a power of two such as 16, 32 or 64 that divides the layer widths)")
    return recipe.replace(name=f"{recipe.name}-rb{block}", rotation_block=block)


def check_output_folder(out: Path, force: bool) -> None:
    """Refuse a file, or a non-empty folder unless ``force``."""
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file, not a folder (choose another --out)")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CliError(f"--out {out} is not empty (pass --force to overwrite it, or choose another --out)")


def run(recipe_name: "str | QuantRecipe", out: str | Path, *, model: str | None = None,
        trajectories: int | None = None, timesteps: int | None = None, steps: int | None = None,
        cfg_scale: float = 1.5, seed: int = 0, rows_per_timestep: int = 256, batch_size: int | None = None,
        profile: str | None = None, packed: bool = True, device: str = "cpu", log=None) -> dict:
    """The command's work as a function (returns the ``run.json`` content). ``log(stage, seconds)`` is
    called after each stage; ``model=None`` reads ``$HQDIT_DIT_WEIGHTS``, else the embedded model."""
    log = log or (lambda stage, seconds: None)
    recipe = get_recipe(recipe_name)  # fail fast on an unknown name
    require_device(device)
    t0 = time.perf_counter()
    bundle, source = load_model(model, "--model", device=device)
    t_load = time.perf_counter()
    log(f"loaded {bundle.name}", t_load - t0)
    check_rotation(bundle.transformer, recipe)  # before the long calibration, not after it
    calib = None
    if recipe.needs_calibration:
        calib = calibrate(bundle, layers=recipe.layers, exclude=recipe.exclude, num_trajectories=trajectories,
                          num_timesteps=timesteps, num_steps=steps, cfg_scale=cfg_scale, seed=seed,
                          batch_size=batch_size, rows_per_timestep=rows_per_timestep,
                          attention=recipe.quantize_attention, profile=profile)
    t1 = time.perf_counter()
    log("calibrated" if calib is not None else "no calibration needed", t1 - t_load)
    _, report, _ = quantized_copy(bundle, recipe, calibration=calib, in_place=True, quantize_identity=True)
    t2 = time.perf_counter()
    log(f"quantized {len(report.layers)} layers with {recipe.name}", t2 - t1)
    out = Path(out)
    save_quantized(bundle.transformer, out, report, packed=packed)
    info = {"recipe": recipe.name, "model": source, "bundle": bundle.name, "device": str(device),
            "calibration": None if calib is None else calib.meta, "calibration_bytes": None if calib is None
            else calib.nbytes(), "seconds_load": t_load - t0, "seconds_calibration": t1 - t_load,
            "seconds_quantize": t2 - t1, "peak_rss_mb": _peak_rss_mb(), "summary": report.summary()}
    write_json_atomic(out / RUN_FILE, info)
    write_manifest(out, {"written_by": "hqdit quantize", "recipe": recipe.name})  # now covering run.json too
    log(f"saved to {out}", time.perf_counter() - t2)
    return info


def load_quantized_folder(folder: "str | Path", model: str | None = None, device: str = "cpu"):
    """``(bundle, tag)``: the model recorded in ``folder/run.json`` (or ``model``, when given) with the quantized
    state of ``folder`` loaded into its transformer (packed 4-bit weights included); ``tag`` names the recipe
    and the folder's :func:`~hqdit_utils.engine.qmodel.folder_tag` (the sha256 of its manifest, which lists every file's),
    for :func:`~hqdit_utils.dit.sampling.write_samples`; warnings of the reload (a ``model`` of other weights than
    the folder was quantized from, a folder without manifest) are printed as one line each on stderr. Expected problems raise
    :class:`CliError` (or the ``FileNotFoundError`` / ``QuantizationError`` of ``load_quantized``)."""
    folder = Path(folder)
    redo = f"re-create it with hqdit quantize --recipe NAME --out {folder} --force"
    if not folder.is_dir():
        raise CliError(f"--quantized {folder} is not a folder (create one with hqdit quantize --recipe NAME "
                       f"--out {folder})")
    run_file = folder / RUN_FILE
    recorded = None
    if run_file.is_file():
        try:
            recorded = json.loads(run_file.read_text())["model"]
        except (ValueError, KeyError, TypeError) as err:
            raise CliError(f"{run_file} is damaged ({type(err).__name__}: {one_line(err)}) ({redo})") from None
    elif model is None:
        raise CliError(f"{run_file} not found, so the model {folder} was quantized from is unknown (pass --model "
                       f"SOURCE, or {redo})")
    bundle, _ = load_model(model or recorded, "--model", device=device)
    with warnings.catch_warnings(record=True) as caught:  # other weights, no manifest: one line each
        warnings.simplefilter("always")
        load_quantized(bundle.transformer, folder)
    for w in caught:
        print(f"[hqdit] warning: {one_line(w.message)}", file=sys.stderr, flush=True)
    recipe = getattr(bundle.transformer, "_hqdit_recipe", None)
    return bundle, f"quantized {recipe} {folder_tag(folder)}"


def unrestored_parts(folder: "str | Path") -> list[str]:
    """What of the recipe saved in ``folder`` :func:`~hqdit_utils.engine.qmodel.load_quantized` does not rebuild
    (quantized attention matmuls, per-timestep-group activation ranges); empty when the reload is complete."""
    fields = json.loads((Path(folder) / "quant_config.json").read_text()).get("recipe_fields") or {}
    parts = []
    if fields.get("quantize_attention"):
        parts.append("quantized attention matmuls")
    if (fields.get("timestep_groups") or 1) > 1:
        parts.append("per-timestep-group activation ranges")
    return parts


def _log(stage: str, seconds: float) -> None:
    print(f"[hqdit quantize] {stage} ({seconds:.1f} s)", file=sys.stderr, flush=True)


def _cmd(args: argparse.Namespace) -> int:
    if args.list:
        for name in sorted(RECIPES):
            print(f"{name:22s} {RECIPES[name].description}")
        return 0
    if not args.recipe or not args.out:
        raise CliError("--recipe and --out are required (or pass --list to see the recipes)")
    try:
        recipe = get_recipe(args.recipe)
    except KeyError as err:  # unknown recipe: the message lists the names
        raise CliError(f"{err.args[0]} (pass one of them to --recipe)") from None
    if args.rotation_block is not None:
        recipe = with_rotation_block(recipe, args.rotation_block)
    check_output_folder(Path(args.out), args.force)
    info = run(recipe, args.out, model=args.model, trajectories=args.trajectories, timesteps=args.timesteps,
               steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed, rows_per_timestep=args.rows_per_timestep,
               batch_size=args.batch_size, packed=not args.float_weights, device=args.device, log=_log)
    s = info["summary"]
    print(f"{s['recipe']}: {s['layers']} layers, mean SQNR weight {s['weight_sqnr']:.2f} dB, activation "
          f"{s['act_sqnr']:.2f} dB, layer output {s['output_sqnr']:.2f} dB; weight formats {s['weight_formats']}, "
          f"activation formats {s['act_formats']} -> {args.out}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``hqdit quantize``."""
    p = subparsers.add_parser("quantize", help="calibrate and quantize a DiT with a named recipe; save state + plan",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="recipe name (see --list)")
    p.add_argument("--model", default=None,
                   help="model source for load_dit (default: $HQDIT_DIT_WEIGHTS, else the embedded model)")
    p.add_argument("--out", help="output folder (must be empty or new unless --force)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    p.add_argument("--rotation-block", type=int, default=None, metavar="N",
                   help="Hadamard rotation in blocks of N (rotated recipes only; the recipe is renamed <recipe>-rbN)")
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
