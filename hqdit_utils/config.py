"""Every size the book uses, in one place, chosen by one switch: ``HQDIT_PROFILE``.

``ci``   — seconds per chapter (CI smoke runs);
``book`` — the default: the numbers the published book shows;
``full`` — DiT-XL/2 on a GPU (calibration and sample counts of the paper's protocol, our defaults).

Chapters read sizes from :func:`profile`; they never hard-code a sample count.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, asdict
from pathlib import Path

#: Root of the repository (the folder that holds ``data/``), when the package is used from a checkout.
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Shipped artefacts: the embedded model, the paper's numbers, results of full-scale runs.
DATA_DIR = Path(os.environ.get("HQDIT_DATA", REPO_ROOT / "data"))
#: Where experiment results are cached (see ``experiments.py``).
CACHE_DIR = Path(os.environ.get("HQDIT_CACHE", REPO_ROOT / ".hqdit_cache"))


@dataclass(frozen=True)
class Profile:
    """Sizes of one profile.

    calib_trajectories: number of class-conditional sampling trajectories used for calibration.
    calib_timesteps:    number of timesteps (uniformly spread over the sampling schedule) recorded.
    eval_samples:       images generated per evaluated run.
    sampling_steps:     denoising steps of the respaced DDPM schedule.
    seeds:              how many independent seeds each measured table row averages over.
    """

    name: str
    calib_trajectories: int
    calib_timesteps: int
    eval_samples: int
    sampling_steps: int
    seeds: int
    batch_size: int

    def as_dict(self) -> dict:
        return asdict(self)


PROFILES = {
    "ci": Profile("ci", calib_trajectories=4, calib_timesteps=4, eval_samples=32, sampling_steps=10, seeds=1, batch_size=32),
    "book": Profile("book", calib_trajectories=32, calib_timesteps=10, eval_samples=256, sampling_steps=25, seeds=3, batch_size=128),
    "full": Profile("full", calib_trajectories=32, calib_timesteps=25, eval_samples=50_000, sampling_steps=100, seeds=1, batch_size=32),
}


def profile(name: str | None = None) -> Profile:
    """The active profile: ``name`` if given, else ``$HQDIT_PROFILE``, else ``"book"``."""
    name = name or os.environ.get("HQDIT_PROFILE", "book")
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown HQDIT_PROFILE {name!r}; choose one of {sorted(PROFILES)}") from None
