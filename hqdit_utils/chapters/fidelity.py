"""Fidelity to FP32: how far each quantized sample lies from the FP32 sample made from the same noise.

A run of seed ``s`` draws sample ``i`` from label ``i mod K`` and noise seed ``SEED_STRIDE·(s + 1) + i``
(:func:`~hqdit_utils.runs.experiments.sample_plan`), whatever the recipe. So sample ``i`` of a quantized run and
sample ``i`` of the FP32 run of the same seed are *twins*: the same request answered by two models, and
their difference is what quantization did to that image. sFID* asks "is the distribution of the samples
still close to the data?"; fidelity asks "are the samples still the FP32 model's samples?" — a question a
distribution metric cannot answer (a model that draws *different* good digits scores as well as FP32).

Per sample (images uint8 ``[N, H, W, C]``, grey levels 0..255):

* ``RMS to FP32`` — root-mean-square pixel difference to the twin, in grey levels;
* ``feature distance to FP32`` — Euclidean distance between the twins' pooled proxy features
  (:class:`~hqdit_utils.metrics.features.ProxyExtractor` ``pool``, 128-d; the features FID* uses).

Per run: the mean of each over the samples, and ``PSNR to FP32`` = 10·log10(255² / MSE) with the MSE
pooled over all pixels of the run (our choice: a per-sample PSNR is infinite for a bit-identical sample,
and such samples occur). A run compared with itself has RMS 0, feature distance 0 and PSNR ``inf``.

* :func:`per_sample_fidelity` — the per-sample numbers of two image batches;
* :func:`run_fidelity` — the run-level numbers of two finished runs (:class:`RunResult` or samples files),
  after checking that they are twins (same labels, same count);
* :func:`with_fidelity` — a :func:`~hqdit_utils.runs.experiments.run_table` frame with those columns added;
* :func:`fidelity_table` — one row per (recipe, seed) with the three run-level numbers, ready for
  :func:`~hqdit_utils.chapters.tables.paired_interval` (lower RMS / distance and higher PSNR are better).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["RMS", "PSNR", "FEATURE", "FIDELITY_METRICS", "per_sample_fidelity", "load_samples", "run_fidelity",
           "fidelity_table", "with_fidelity"]

RMS = "RMS to FP32"
PSNR = "PSNR to FP32"
FEATURE = "feature distance to FP32"
#: The run-level fidelity columns of :func:`fidelity_table`.
FIDELITY_METRICS = (FEATURE, RMS, PSNR)

_PEAK = 255.0


def _as_uint8(images, what: str) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"{what} must be uint8 images [N, H, W, C]; got {x.dtype} of shape {x.shape}")
    return x


def per_sample_fidelity(images, reference, extractor=None) -> dict[str, np.ndarray]:
    """Distance of every image to its twin in ``reference``.

    Args:
        images, reference: uint8 ``[N, H, W, C]`` of the same shape; image ``i`` is compared with ``i``.
        extractor: a feature extractor returning ``pool`` ``[N, D]``; default the embedded
            :class:`~hqdit_utils.metrics.features.ProxyExtractor`. ``False`` skips the features.

    Returns:
        ``{"rms": [N] grey levels, "mse": [N] grey levels², "feature": [N] (absent when skipped)}``,
        float64 numpy arrays.
    """
    a, b = _as_uint8(images, "images"), _as_uint8(reference, "reference images")
    if a.shape != b.shape:
        raise ValueError(f"images {a.shape} and reference {b.shape} differ in shape; compare twins from runs of "
                         "the same seed and sample count")
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = (diff ** 2).reshape(len(a), -1).mean(axis=1)
    out = {"rms": np.sqrt(mse), "mse": mse}
    if extractor is not False:
        if extractor is None:
            from ..metrics.features import ProxyExtractor
            extractor = ProxyExtractor()
        fa = np.asarray(extractor(a)["pool"], dtype=np.float64)
        fb = np.asarray(extractor(b)["pool"], dtype=np.float64)
        out["feature"] = np.linalg.norm(fa - fb, axis=1)
    return out


def load_samples(source) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``[N, H, W, C]`` and labels ``[N]`` of a :class:`RunResult` or a samples ``.npz``."""
    path = Path(getattr(source, "samples", source))
    if not path.is_file():
        raise FileNotFoundError(f"samples file {path} not found; run the recipe first (experiments.run)")
    with np.load(path, allow_pickle=False) as f:
        return f["arr_0"], f["labels"]


def run_fidelity(result, reference_result, extractor=None) -> dict[str, float]:
    """Run-level fidelity of ``result`` to ``reference_result`` (each a :class:`RunResult` or samples file).

    Returns ``{FEATURE: mean distance, RMS: mean grey levels, PSNR: dB over all pixels, "samples": N}``.

    Raises:
        ValueError: the two runs are not twins (different sample counts or labels, or — for two
            RunResults — different seeds).
    """
    seeds = [getattr(r, "seed", None) for r in (result, reference_result)]
    if None not in seeds and seeds[0] != seeds[1]:
        raise ValueError(f"runs of seeds {seeds[0]} and {seeds[1]} are not twins; compare runs of the same seed")
    a, la = load_samples(result)
    b, lb = load_samples(reference_result)
    if len(a) != len(b) or not np.array_equal(la, lb):
        raise ValueError(f"the runs are not twins ({len(a)} and {len(b)} samples, labels "
                         f"{'equal' if np.array_equal(la, lb) else 'different'}); compare runs of the same seed "
                         "and sample count")
    d = per_sample_fidelity(a, b, extractor)
    mse = float(d["mse"].mean())
    psnr = float("inf") if mse == 0 else float(10 * np.log10(_PEAK ** 2 / mse))
    return {FEATURE: float(d["feature"].mean()), RMS: float(d["rms"].mean()), PSNR: psnr, "samples": len(a)}


def fidelity_table(bundle, recipes: Sequence[str], seeds: Sequence[int], *, reference: str = "fp32",
                   extractor=None, **run_kwargs) -> pd.DataFrame:
    """One row per (recipe, seed): ``recipe``, ``seed`` and :data:`FIDELITY_METRICS` against ``reference``'s
    run of the same seed. Every run is read through :func:`~hqdit_utils.runs.experiments.run` (cached or adopted
    runs are read, missing ones computed; ``run_kwargs`` are passed on, e.g. ``num_samples``)."""
    from ..runs.experiments import run
    from ..metrics.features import ProxyExtractor

    extractor = extractor or ProxyExtractor()
    rows = []
    for s in seeds:
        ref = run(bundle, reference, seed=s, progress=False, **run_kwargs)
        for r in recipes:
            res = ref if r == reference else run(bundle, r, seed=s, progress=False, **run_kwargs)
            f = run_fidelity(res, ref, extractor)
            rows.append({"recipe": r, "seed": s, **{m: f[m] for m in FIDELITY_METRICS}})
    order = {r: i for i, r in enumerate(recipes)}
    return pd.DataFrame(rows).sort_values(["recipe", "seed"], key=lambda c: c.map(order) if c.name == "recipe"
                                          else c, kind="stable").reset_index(drop=True)


def with_fidelity(bundle, table: pd.DataFrame, *, reference: str = "fp32", extractor=None, **run_kwargs) -> pd.DataFrame:
    """``table`` (a :func:`~hqdit_utils.runs.experiments.run_table` frame that includes ``reference``) with the
    :data:`FIDELITY_METRICS` of each run added as columns (same rows, same order)."""
    recipes = list(dict.fromkeys(table["recipe"]))
    seeds = sorted(set(table["seed"]))
    fid = fidelity_table(bundle, recipes, seeds, reference=reference, extractor=extractor, **run_kwargs)
    return table.drop(columns=[m for m in FIDELITY_METRICS if m in table.columns]).merge(
        fid, on=["recipe", "seed"], how="left", validate="one_to_one")
