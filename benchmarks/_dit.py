"""Shared pieces of the model-level benchmarks: fixed denoiser inputs, timed forwards, timed PTQ."""
from __future__ import annotations

import time

import torch

from hqdit_utils.runs import experiments
from hqdit_utils.engine.calibration import calibrate
from hqdit_utils.dit.sampling import denoise_batch
from hqdit_utils.timing import interleaved_medians

#: The recipes whose denoiser forward is timed, with the issue's targets (× the FP32 forward; None = report).
FORWARD_TARGETS = {"int4-rtn": None, "fp4-hybrid": 1.3, "hqdit-w4a4": 1.6}


def denoiser_inputs(bundle, batch: int, seed: int = 0):
    """A fixed (latents [batch, C, s, s], timestep [batch], class labels [batch]) for one denoiser call."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, bundle.latent_channels, bundle.latent_size, bundle.latent_size, generator=g)
    return x, torch.full((batch,), 500, dtype=torch.long), torch.arange(batch) % bundle.num_classes


def forward_medians(models: dict, inputs, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of one no-grad forward ``model(x, timestep=t, class_labels=y)`` of each model, timed
    round-robin after ``warmup`` untimed calls each."""
    x, t, y = inputs

    def call(model):
        @torch.no_grad()
        def run():
            return model(x, timestep=t, class_labels=y).sample
        return run
    return interleaved_medians({name: call(m) for name, m in models.items()}, repeats=repeats, warmup=warmup)


class Bf16Autocast(torch.nn.Module):
    """``model`` called under CPU bfloat16 autocast (its linears and matmuls in BF16): what a CPU user would run
    instead of FP32, the bar of issue 30. Same call signature as ``model``."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(*args, **kwargs)


def quantized_copy(model, recipe, calib):
    """A deep copy of the transformer ``model`` quantized with ``recipe`` (a name or a QuantRecipe) by the package's
    one run pipeline (:func:`hqdit_utils.runs.experiments.quantized_copy`); returns (copy, quantize_ seconds)."""
    q, _, seconds = experiments.quantized_copy(model, recipe, calibration=calib)
    return q, seconds


def calibration_protocol(n: int, steps: int, timesteps: int, batch_size: int, cfg_scale: float = 1.5) -> dict:
    return {"num_trajectories": n, "num_steps": steps, "num_timesteps": timesteps, "batch_size": batch_size,
            "cfg_scale": cfg_scale}


def profile_protocol(prof) -> dict:
    """The calibration protocol of a :class:`hqdit_utils.config.Profile` (its trajectories, steps, timesteps, batch)."""
    return calibration_protocol(prof.calib_trajectories, prof.sampling_steps, prof.calib_timesteps, prof.batch_size)


def plain_trajectories_seconds(bundle, proto: dict, seed: int = 0) -> float:
    """Seconds of the FP32 sampling trajectories a calibration with ``proto`` runs, without recording:
    the forward passes that calibration needs (same labels, seeds, steps, batches and guidance)."""
    n, bs = proto["num_trajectories"], proto["batch_size"]
    labels = torch.arange(n) % bundle.num_classes
    seeds = [seed + i for i in range(n)]
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, bs):
            denoise_batch(bundle, labels[i:i + bs], seeds[i:i + bs], num_steps=proto["num_steps"],
                          cfg_scale=proto["cfg_scale"])
    return time.perf_counter() - t0


def timed_ptq(bundle, recipe: str, proto: dict, seed: int = 0):
    """Whole PTQ of a copy of ``bundle.transformer``: calibration with ``proto`` then ``quantize_``.
    Returns (quantized copy, calibration seconds, quantize_ seconds, calibration)."""
    t0 = time.perf_counter()
    calib = calibrate(bundle, seed=seed, **proto)
    t_cal = time.perf_counter() - t0
    q, t_q = quantized_copy(bundle.transformer, recipe, calib)
    return q, t_cal, t_q, calib
