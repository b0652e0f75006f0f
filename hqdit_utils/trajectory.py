"""Where along the denoising schedule does quantization hurt? Per-step errors of a quantized denoiser.

Two complementary measurements, both on the *same* labels and per-sample seeds as the FP32 reference:

* **local error** — at every step of the FP32 trajectory, feed the *same* input ``x_t`` to the FP32 and
  to the quantized transformer and compare their guided noise predictions ``ε``. This isolates what
  quantization does to one call of the denoiser at that noise level, without accumulated drift.
* **drift** — sample a second trajectory with the quantized transformer (same seeds, so the same initial
  noise and the same DDPM noise at every step) and compare its latent ``x_t`` with the FP32 trajectory's
  after every step. This is what the errors of all previous steps add up to.

Both are relative L2 errors ``‖a − b‖ / ‖b‖`` over the whole batch. :func:`quantized_bundle` builds (and
caches on disk) the quantized copy of a model with the same calibration as :func:`~hqdit_utils.experiments.run`.
"""
from __future__ import annotations

import copy
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from .config import CACHE_DIR, Profile, profile as get_profile
from .experiments import calibration_for, model_checksum, recipe_material, run_key
from .numerics import NUMERICS_VERSION
from .qmodel import load_quantized, quantize_, save_quantized
from .recipes import get_recipe
from .sampling import denoise_batch

__all__ = ["quantized_bundle", "trajectory_error"]


def quantized_bundle(bundle, recipe, *, profile=None, seed: int = 0, cfg_scale: float = 1.5,
                     cache_dir: "str | os.PathLike | None" = None):
    """A copy of ``bundle`` whose transformer is quantized with ``recipe`` (``bundle`` is left unchanged).

    Calibration is the one :func:`~hqdit_utils.experiments.run` uses for the same (profile, seed, cfg),
    so the quantized model is the one whose images the run evaluated. The quantized state is cached in
    ``<cache>/qmodels/<recipe>-s<seed>-<key>`` (``qmodel.save_quantized``; keyed like :func:`~hqdit_utils.experiments.run`); a second call loads it.
    Returns ``(quantized bundle, summary dict)``.
    """
    recipe = get_recipe(recipe)
    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    qb = replace(bundle, transformer=copy.deepcopy(bundle.transformer))
    if recipe.is_identity:
        return qb, {}
    mkey = model_checksum(bundle)
    key = run_key({"model": mkey, "recipe": recipe_material(recipe), "profile": prof.as_dict(), "seed": seed,
                   "cfg_scale": cfg_scale, "numerics": NUMERICS_VERSION})
    folder = Path(cache_dir or CACHE_DIR / "qmodels") / f"{recipe.name}-s{seed}-{key}"
    if (folder / "quant_config.json").is_file() and not recipe.quantize_attention and recipe.timestep_groups == 1:
        load_quantized(qb.transformer, folder)
        return qb, {"recipe": recipe.name, "cached": True}
    calib = calibration_for(bundle, recipe, prof, seed, cfg_scale, mkey) if recipe.needs_calibration else None
    report = quantize_(qb.transformer, recipe, calib)
    try:
        save_quantized(qb.transformer, folder, report)
    except Exception:  # caching is an optimisation only
        pass
    return qb, {**report.summary(), "cached": False}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@torch.no_grad()
def trajectory_error(reference, quantized, labels: Sequence[int], seeds: Sequence[int], *, num_steps: int,
                     cfg_scale: float = 1.5, sampler: str = "ddpm") -> pd.DataFrame:
    """Per-step local error of ``quantized``'s noise prediction and the drift of its trajectory.

    Args:
        reference, quantized: two :class:`~hqdit_utils.models.DiTBundle` s with the same scheduler (the
            FP32 model and its quantized copy).
        labels, seeds: one class label and one seed per sample (as :func:`~hqdit_utils.sampling.sample`).
        num_steps, cfg_scale, sampler: the sampling protocol.

    Returns:
        one row per step: ``step`` (0 = first, noisiest), ``timestep``, ``local error`` (relative L2 of the
        guided ε of the quantized model against FP32's, both on FP32's ``x_t``) and ``drift`` (relative L2
        of the quantized trajectory's input ``x_t`` against FP32's at that step; 0 at step 0).
    """
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    C = reference.latent_channels
    B = len(labels)
    guided = cfg_scale != 1.0

    def guide(out):
        eps = out.float()[:, :C]
        if guided:
            e_c, e_u = eps[:B], eps[B:]
            eps = e_u + cfg_scale * (e_c - e_u)
        return eps

    ref_model, q_model = reference.transformer, quantized.transformer
    local, ts, ref_inputs, q_inputs = [], [], [], []

    def ref_call(x, t, y):
        out = ref_model(x, timestep=t, class_labels=y).sample
        out_q = q_model(x, timestep=t, class_labels=y).sample
        local.append(_rel(guide(out_q), guide(out)))
        ts.append(int(t[0]))
        ref_inputs.append(x[:B].float().clone())
        return out

    def q_call(x, t, y):
        q_inputs.append(x[:B].float().clone())
        return q_model(x, timestep=t, class_labels=y).sample

    kw = dict(num_steps=num_steps, cfg_scale=cfg_scale, sampler=sampler)
    x_ref = denoise_batch(reference, labels, seeds, transformer_fn=ref_call, **kw)
    x_q = denoise_batch(quantized, labels, seeds, transformer_fn=q_call, **kw)
    drift = [_rel(a, b) for a, b in zip(q_inputs, ref_inputs)]
    df = pd.DataFrame({"step": range(len(local)), "timestep": ts, "local error": local, "drift": drift})
    df.attrs["final drift"] = _rel(x_q, x_ref)
    return df
