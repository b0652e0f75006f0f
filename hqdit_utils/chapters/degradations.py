"""Known degradations of a batch of samples, to see what each metric resolves before it judges anything.

Every function takes uint8 images ``[N, H, W, C]`` (grey levels 0..255) and returns uint8 images of the
same shape:

* :func:`pixel_noise` — add Gaussian noise of standard deviation ``sigma`` grey levels (seeded), round, clip;
* :func:`blur` — Gaussian blur of standard deviation ``radius`` pixels (``scipy.ndimage``, edges reflected);
* :func:`requantize` — keep ``levels`` evenly spaced grey levels (a bit-width ladder on the *pixels*).

:func:`degradation_ladder` applies a list of them to one batch and measures each result with the
package's metrics (:func:`~hqdit_utils.metrics.adm.evaluate`: sFID*, FID*, KID* …) against a reference
set and with :mod:`.fidelity` against the undegraded batch.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd

__all__ = ["pixel_noise", "blur", "requantize", "degradation_ladder"]


def _check(images) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"images must be uint8 [N, H, W, C]; got {x.dtype} of shape {x.shape}")
    return x


def pixel_noise(images, sigma: float, seed: int = 0) -> np.ndarray:
    """``images`` + N(0, ``sigma``²) per pixel (grey levels), rounded and clipped to 0..255."""
    x = _check(images).astype(np.float64)
    noise = np.random.default_rng(seed).normal(0.0, sigma, size=x.shape)
    return np.clip(np.rint(x + noise), 0, 255).astype(np.uint8)


def blur(images, radius: float) -> np.ndarray:
    """Gaussian blur of each image with standard deviation ``radius`` pixels (no blur across images or channels)."""
    from scipy.ndimage import gaussian_filter

    x = _check(images).astype(np.float64)
    out = gaussian_filter(x, sigma=(0, radius, radius, 0), mode="reflect")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def requantize(images, levels: int) -> np.ndarray:
    """Each pixel rounded to the nearest of ``levels`` evenly spaced grey levels between 0 and 255."""
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be between 2 and 256; got {levels}")
    step = 255.0 / (levels - 1)
    x = _check(images).astype(np.float64)
    return np.clip(np.rint(np.rint(x / step) * step), 0, 255).astype(np.uint8)


def degradation_ladder(images, reference, extractor, steps: Sequence[tuple[str, Callable[[np.ndarray], np.ndarray]]],
                       metrics: Sequence[str] = ("sFID*", "FID*", "KID*")) -> pd.DataFrame:
    """One row per ``(name, fn)`` of ``steps`` (plus ``"none"``, the batch itself): ``metrics`` of ``fn(images)``
    against ``reference`` (:func:`~hqdit_utils.metrics.adm.evaluate` with ``extractor``) and its fidelity to
    ``images`` (:data:`~hqdit_utils.chapters.fidelity.FEATURE`, :data:`~hqdit_utils.chapters.fidelity.RMS`)."""
    from .fidelity import FEATURE, RMS, per_sample_fidelity
    from ..metrics.adm import evaluate

    x = _check(images)
    rows = []
    for name, fn in [("none", lambda a: a), *steps]:
        y = fn(x)
        rep = evaluate(y, reference, extractor)
        got = {label: float(getattr(rep, field)) for field, label in rep.metric_names().items()}
        d = per_sample_fidelity(y, x, extractor)
        rows.append({"degradation": name, **{m: got[m] for m in metrics},
                     FEATURE: float(d["feature"].mean()), RMS: float(d["rms"].mean())})
    return pd.DataFrame(rows).set_index("degradation")
