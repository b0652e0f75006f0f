"""Where along the denoising schedule does quantization hurt? Per-step errors of a quantized denoiser.

Two complementary measurements, both on the *same* labels and per-sample seeds as the FP32 reference:

* **local error** — at every step of the FP32 trajectory, feed the *same* input ``x_t`` to the FP32 and
  to the quantized transformer and compare their guided noise predictions ``ε``. This isolates what
  quantization does to one call of the denoiser at that noise level, without accumulated drift.
* **drift** — sample a second trajectory with the quantized transformer (same seeds, so the same initial
  noise and the same DDPM noise at every step) and compare its latent ``x_t`` with the FP32 trajectory's
  after every step. This is what the errors of all previous steps add up to.

Both are relative L2 errors ``‖a − b‖ / ‖b‖`` over the whole batch. :func:`quantized_bundle` gives the quantized
copy of a model with the same calibration as :func:`~hqdit_utils.runs.experiments.run` (cached on disk).
"""
from __future__ import annotations

import os
from typing import Sequence

import pandas as pd
import torch

from ..config import Profile, profile as get_profile
from ..runs.experiments import CalibrationSpec, qmodel_store, quantized_copy
from ..engine.recipes import get_recipe
from ..dit.sampling import denoise_batch

__all__ = ["quantized_bundle", "trajectory_error"]


def quantized_bundle(bundle, recipe, *, profile=None, seed: int = 0, cfg_scale: float = 1.5,
                     cache_dir: "str | os.PathLike | None" = None):
    """A copy of ``bundle`` whose transformer is quantized with ``recipe`` (``bundle`` is left unchanged).

    :func:`~hqdit_utils.runs.experiments.quantized_copy` with the calibration :func:`~hqdit_utils.runs.experiments.run`
    uses for the same (profile, seed, cfg), so the quantized model is the one whose images the run evaluated;
    the quantized state is kept in the one cache of quantized models (:func:`~hqdit_utils.runs.experiments.qmodel_store`,
    under ``cache_dir`` when given) and a second call loads it.
    Returns ``(quantized bundle, summary dict)`` (``{}`` for an identity recipe; ``cached``: loaded from the cache).
    """
    recipe = get_recipe(recipe)
    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    spec = CalibrationSpec(prof, seed, cfg_scale)
    store = None if recipe.is_identity else qmodel_store(bundle, recipe, spec, cache_dir=cache_dir)
    qb, report, _ = quantized_copy(bundle, recipe, calibration=spec, store=store)
    if recipe.is_identity:
        return qb, {}
    if report is None:
        return qb, {"recipe": recipe.name, "cached": True}
    return qb, {**report.summary(), "cached": False}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@torch.no_grad()
def trajectory_error(reference, quantized, labels: Sequence[int], seeds: Sequence[int], *, num_steps: int,
                     cfg_scale: float = 1.5, sampler: str = "ddpm") -> pd.DataFrame:
    """Per-step local error of ``quantized``'s noise prediction and the drift of its trajectory.

    Args:
        reference, quantized: two :class:`~hqdit_utils.dit.models.DiTBundle` s with the same scheduler (the
            FP32 model and its quantized copy).
        labels, seeds: one class label and one seed per sample (as :func:`~hqdit_utils.dit.sampling.sample`).
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
