"""The golden check: catch a behaviour change that :data:`~hqdit_utils.numerics.NUMERICS_VERSION` did not declare.

Stored runs are keyed by what determines their numbers, the code's behaviour entering as one declared integer
(:mod:`hqdit_utils.numerics`). So something must notice when the code's behaviour changes *without* that integer
being bumped. Two checks do, both ours:

* :func:`golden_runs` — a shortened run (:data:`GOLDEN_PROFILE`: 2 calibration trajectories × 2 timesteps,
  4 samples of 4 DDPM steps, seed 0) of every registered recipe, through the very
  :func:`~hqdit_utils.runs.experiments.run` the book calls, on :func:`golden_model` — a small *random* DiT of the
  embedded model's image size and classes (2 blocks × 72), so that the check costs seconds per recipe: it
  tests the code's behaviour, not image quality. :func:`compare_golden` compares them with ``data/golden/``
  (written by :func:`write_golden`, ``make golden``): the samples (uint8 images), the proxy metrics and the
  quantization summary (weight/activation/output SQNR, format histograms). ``tests/test_golden.py`` compares
  :data:`TESTED_RECIPES` (one recipe per code path); ``make check-golden`` compares every recipe.
* :func:`check_store` — a stated subset of the *shipped* book runs (:data:`STORE_CHECK`) recomputed from scratch
  at the book's sizes and compared with ``data/book-runs/`` (``make check-store``, a few minutes): identical images
  on the CPU kind that made the run (its ``result.protocol.machine``), reported differences elsewhere.

Bit for bit where the machine allows: on a machine like the one that wrote the reference (same CPU model, PyTorch
CPU capability and torch version, :func:`machine_key`) every image must be identical and every number equal to
:data:`SAME_MACHINE_RTOL`. On another CPU the float
GEMMs and the int8 kernels may round differently and a flipped activation code moves a sampling trajectory, so
only the kernel-independent part is compared, within :data:`TOLERANCE`: the weight SQNRs and format histograms
(weights are quantized by the same float code on every CPU) — and the differences of the rest are reported.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..config import DATA_DIR, SHIPPED_RUNS_DIR, Profile, profile as get_profile
from .experiments import run
from .run_store import run_machine
from ..files import atomic_path, strict_json, write_json_atomic
from ..numerics import NUMERICS_VERSION
from ..provenance import cpu_model
from ..engine.recipes import RECIPES, list_recipes

__all__ = ["GOLDEN_DIR", "GOLDEN_PROFILE", "TOLERANCE", "SAME_MACHINE_RTOL", "STORE_CHECK", "TESTED_RECIPES", "machine_key", "unrecorded_recipes", "golden_model", "golden_runs",
           "write_golden", "compare_golden", "check_store"]

#: Where the golden outputs live (``golden.json`` + ``samples.npz``).
GOLDEN_DIR = DATA_DIR / "golden"

#: The shortened protocol of a golden run (sizes only; every other setting is the book's).
GOLDEN_PROFILE = Profile("golden", calib_trajectories=2, calib_timesteps=2, eval_samples=4, sampling_steps=4,
                         seeds=1, batch_size=8)

#: The recipes ``tests/test_golden.py`` recomputes, one per code path of ``quantize_`` and the run-time layers:
#: FP32 (sampler, metrics); HQ-DiT (format selection, clipping search, rotation, GPTQ, the integer path); its
#: dynamic and attention variants (per-token scales, the attention processor); FPQ, SmoothQuant-INT and NVFP4
#: (the baselines' search, smoothing, block formats).
TESTED_RECIPES = ("fp32", "hqdit-w4a4", "hqdit-w4a4-dyn", "hqdit-w4a4-attn", "fpq", "smoothquant-int", "nvfp4",
                  "hqdit-w4a3")

#: Relative tolerance of the kernel-independent numbers on a machine unlike the reference's.
TOLERANCE = 1e-3
#: Relative tolerance of the float summaries (SQNRs, metrics) on the reference's machine, where images must be
#: identical: measured, two runs of the same code on one machine differ in the last digit of a mean activation
#: SQNR (1e-16 relative: the float GEMM library's summation order varies with memory alignment).
SAME_MACHINE_RTOL = 1e-9

#: The shipped runs :func:`check_store` recomputes: FP32 (float GEMMs, sampler, metrics) and HQ-DiT (every step of
#: ``quantize_`` and the integer path), seed 0, the book's sizes.
STORE_CHECK = (("fp32", 0), ("hqdit-w4a4", 0), ("hqdit-w4a3", 0))


def machine_key() -> dict:
    """What must match for bit-for-bit comparison: CPU model, PyTorch's CPU capability, torch version."""
    return {"cpu": cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def golden_model():
    """The model of the golden runs: :func:`~hqdit_utils.dit.models.tiny_dit` (seed 0) at 16×16 pixels, 10 classes."""
    from ..dit.models import tiny_dit

    return tiny_dit(0, sample_size=16, num_classes=10)


def _summary(result) -> dict:
    """The numbers of one run compared by :func:`compare_golden` (JSON-able)."""
    quant = {k: v for k, v in result.quant.items() if k in ("weight_sqnr", "act_sqnr", "output_sqnr",
                                                           "weight_formats", "act_formats")}
    return {"metrics": result.metrics, "quant": quant}


def golden_runs(recipes: Iterable[str] | None = None, *, bundle=None) -> dict:
    """``{recipe: {"samples": uint8 [4, H, W, C], "metrics": {...}, "quant": {...}}}`` of a shortened run of each
    recipe (default: every registered recipe), computed now in a temporary cache (nothing stored is read)."""
    bundle = bundle or golden_model()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in (sorted(RECIPES) if recipes is None else list(recipes)):
            r = run(bundle, name, profile=GOLDEN_PROFILE, seed=0, cache_dir=tmp, shipped_dir=None, progress=False)
            with np.load(r.samples, allow_pickle=False) as z:
                out[name] = {"samples": z["arr_0"].copy(), **_summary(r)}
    return out


def write_golden(folder: "str | Path" = GOLDEN_DIR, recipes: Iterable[str] | None = None) -> Path:
    """Compute :func:`golden_runs` and write them to ``folder`` (after a change that bumped the numerics version)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    runs = golden_runs(recipes)
    with atomic_path(folder / "samples.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{name: r["samples"] for name, r in runs.items()})
    write_json_atomic(folder / "golden.json", {
        "numerics": NUMERICS_VERSION, "machine": machine_key(), "profile": GOLDEN_PROFILE.as_dict(), "seed": 0,
        "runs": {name: {k: v for k, v in r.items() if k != "samples"} for name, r in runs.items()}})
    return folder


def _close(a, b, rtol: float) -> bool:
    """Numbers (or nested dicts/lists of them) equal within ``rtol``; NaN equals NaN, ``None`` (stored NaN) too."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rtol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    a = float("nan") if a is None else float(a)
    b = float("nan") if b is None else float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= rtol * max(abs(a), abs(b))


def unrecorded_recipes(folder: "str | Path" = GOLDEN_DIR) -> list[str]:
    """Registered recipes that ``folder``'s golden runs do not cover (each one a problem for :func:`compare_golden`:
    a recipe added without ``make golden`` would otherwise never be checked)."""
    stored = json.loads((Path(folder) / "golden.json").read_text())["runs"]
    return [name for name in list_recipes() if name not in stored]


def compare_golden(folder: "str | Path" = GOLDEN_DIR, recipes: Iterable[str] | None = None) -> tuple[bool, list[str]]:
    """Recompute the golden runs of ``recipes`` (default: every stored one) and compare them with ``folder``.

    Returns ``(exact, problems)``: ``exact`` whether this machine matches the reference's :func:`machine_key` (then
    every number and image must be identical), ``problems`` one line per difference that fails the check (empty:
    the check passes). On another machine the weight SQNRs and format histograms must agree within
    :data:`TOLERANCE`; the other differences are listed with an ``(info)`` prefix and do not fail."""
    folder = Path(folder)
    stored = json.loads((folder / "golden.json").read_text())
    problems: list[str] = []
    if stored["numerics"] != NUMERICS_VERSION:
        problems.append(f"data/golden was written for numerics version {stored['numerics']}, the code declares "
                        f"{NUMERICS_VERSION}: regenerate it with `make golden`")
        return False, problems
    exact = stored["machine"] == machine_key()
    names = list(stored["runs"]) if recipes is None else list(recipes)
    if recipes is None:
        problems += [f"{name}: a registered recipe with no golden run (regenerate data/golden with `make golden`)"
                     for name in unrecorded_recipes(folder)]
    now = golden_runs(names)
    with np.load(folder / "samples.npz", allow_pickle=False) as z:
        images = {name: z[name] for name in names}
    for name in names:
        ref, new = stored["runs"][name], now[name]
        new_json = json.loads(strict_json(new["metrics"] | {"quant": new["quant"]}))  # NaN/inf stored as null
        ref_json = ref["metrics"] | {"quant": ref["quant"]}
        same_images = np.array_equal(images[name], new["samples"])
        if exact:
            if not same_images:
                diff = np.abs(images[name].astype(int) - new["samples"].astype(int))
                problems.append(f"{name}: samples differ (max {diff.max()} grey levels, {int((diff > 0).sum())} pixels)")
            if not _close(new_json, ref_json, SAME_MACHINE_RTOL):
                problems.append(f"{name}: metrics or quantization summary differ: {new_json} vs stored {ref_json}")
            continue
        for key in ("weight_sqnr", "weight_formats", "act_formats"):
            if not _close(new["quant"].get(key), ref["quant"].get(key), TOLERANCE):
                problems.append(f"{name}: {key} {new['quant'].get(key)} vs stored {ref['quant'].get(key)}")
        if not same_images:
            problems.append(f"(info) {name}: samples differ on this machine (not compared bit for bit: "
                            f"reference made on {stored['machine']})")
    return exact, [p for p in problems if not p.startswith("(info)")] + [p for p in problems if p.startswith("(info)")]


def check_store(pairs: Iterable[tuple[str, int]] = STORE_CHECK, *, shipped_dir: "str | Path" = SHIPPED_RUNS_DIR,
                profile: str = "book") -> list[dict]:
    """Recompute the shipped runs ``pairs`` (recipe, seed) from scratch at ``profile``'s sizes and compare them
    with the store: one dict per run (``identical`` images out of ``images``, ``Δ <metric>`` = now − stored)."""
    from ..dit.models import load_dit

    bundle, prof, rows = load_dit("embedded"), get_profile(profile), []
    with tempfile.TemporaryDirectory() as tmp:
        for name, seed in pairs:
            new = run(bundle, name, profile=prof, seed=seed, cache_dir=tmp, shipped_dir=None, progress=False)
            shipped = Path(shipped_dir) / Path(new.samples).parent.name  # same key material, same folder name
            if not (shipped / "result.json").is_file():
                rows.append({"recipe": name, "seed": seed, "shipped": False})
                continue
            with np.load(shipped / "samples.npz", allow_pickle=False) as a, \
                    np.load(new.samples, allow_pickle=False) as b:
                same = [np.array_equal(x, y) for x, y in zip(a["arr_0"], b["arr_0"])]
            entry = json.loads((shipped / "result.json").read_text())
            made_on, old = run_machine(entry), entry["result"]["metrics"]
            rows.append({"recipe": name, "seed": seed, "shipped": True, "identical": int(sum(same)),
                         "images": len(same), "made on": made_on,
                         "same CPU kind": (made_on["cpu"], made_on["torch cpu capability"])
                         == (cpu_model(), machine_key()["capability"]),
                         **{f"Δ {k}": new.metrics[k] - old[k] for k in old if old[k] is not None}})
    return rows


if __name__ == "__main__":  # make golden / make check-store
    import sys

    if sys.argv[1:] == ["write"]:
        print(f"wrote {write_golden()}")
    elif sys.argv[1:] == ["check"]:
        exact, problems = compare_golden()
        print(f"compared {'bit for bit' if exact else f'within {TOLERANCE} (another machine)'}: "
              f"{len([p for p in problems if not p.startswith('(info)')])} problems", *problems, sep="\n")
        sys.exit(1 if any(not p.startswith("(info)") for p in problems) else 0)
    elif sys.argv[1:] == ["store"]:
        rows = check_store()
        for r in rows:
            print(r)
        print(f"this machine: {cpu_model()} ({machine_key()['capability']}); a run made on the same CPU kind must give "
              "identical images, one made on another kind is reported, not failed (float rounding differs, and a "
              "flipped activation code moves a quantized trajectory)")
        ok = all(r.get("shipped") for r in rows) and all(r["identical"] == r["images"] for r in rows
                                                         if r["same CPU kind"])
        sys.exit(0 if ok else 1)
    else:
        sys.exit("usage: python -m hqdit_utils.runs.golden write|check|store")
