"""Every size the book uses, in one place, chosen by one switch: ``HQDIT_PROFILE``.

``ci``   — seconds per chapter (CI smoke runs);
``book`` — the default: the numbers the published book shows;
``full`` — DiT-XL/2 on a GPU (calibration and sample counts of the paper's protocol, our defaults).

Chapters read sizes from :func:`profile`; they never hard-code a sample count.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

#: Root of the repository (the folder that holds ``data/``), when the package is used from a checkout.
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Shipped artefacts: the embedded model, the paper's numbers, results of full-scale runs.
DATA_DIR = Path(os.environ.get("HQDIT_DATA", REPO_ROOT / "data"))
#: Where experiment results are cached (see ``experiments.py``).
CACHE_DIR = Path(os.environ.get("HQDIT_CACHE", REPO_ROOT / ".hqdit_cache"))
#: Finished runs shipped with the book (made by a cold ``make book``, copied by ``make book-results``):
#: :func:`~hqdit_utils.runs.experiments.run` adopts an entry from here when its key material matches exactly,
#: else computes. ``HQDIT_SHIPPED_RUNS=none`` turns it off (every run computed).
SHIPPED_RUNS_DIR = (None if os.environ.get("HQDIT_SHIPPED_RUNS", "").lower() in ("none", "off", "0")
                    else Path(os.environ.get("HQDIT_SHIPPED_RUNS") or DATA_DIR / "book-runs"))


@dataclass(frozen=True)
class Profile:
    """Sizes of one profile.

    calib_trajectories: number of class-conditional sampling trajectories used for calibration.
    calib_timesteps:    number of timesteps (uniformly spread over the sampling schedule) recorded.
    eval_samples:       images generated per evaluated run.
    sampling_steps:     denoising steps of the respaced DDPM schedule.
    seeds:              how many independent seeds the small tables of chapters 1–6 and 8 average over.
    table_seeds:        how many paired seeds *every* row of chapter 7's comparison runs (each seed =
                        calibration trajectories + sample labels + noise); override with
                        ``$HQDIT_TABLE_SEEDS`` (e.g. ``HQDIT_TABLE_SEEDS=5`` for the full design).
    sample_check_factor: chapter 7's sample-count check runs its rows at this many times ``eval_samples``.
    """

    name: str
    calib_trajectories: int
    calib_timesteps: int
    eval_samples: int
    sampling_steps: int
    seeds: int
    batch_size: int
    table_seeds: int = 2
    sample_check_factor: int = 4

    #: Fields that size a table's *design* (how many runs), not any one run: left out of :meth:`as_dict`,
    #: which is the cache-key material of a run, so that ``$HQDIT_TABLE_SEEDS=5`` reuses the cached seeds.
    DESIGN_FIELDS = ("table_seeds", "sample_check_factor")

    def as_dict(self) -> dict:
        """The sizes that determine one run's numbers (every field but :attr:`DESIGN_FIELDS`)."""
        return {k: v for k, v in asdict(self).items() if k not in self.DESIGN_FIELDS}


PROFILES = {
    "ci": Profile("ci", calib_trajectories=4, calib_timesteps=4, eval_samples=32, sampling_steps=10, seeds=1, batch_size=32,
                  table_seeds=2),
    # book: 2 paired seeds for a notebook opened in Jupyter (chapter 7 alone ~54 min cold on 2 AVX2 cores); `make
    # book` sets HQDIT_TABLE_SEEDS=5, the full design (~95 min more of runs, read from data/book-runs/ when shipped).
    "book": Profile("book", calib_trajectories=32, calib_timesteps=10, eval_samples=256, sampling_steps=25, seeds=3, batch_size=128,
                    table_seeds=2),
    "full": Profile("full", calib_trajectories=32, calib_timesteps=25, eval_samples=50_000, sampling_steps=100, seeds=1, batch_size=32,
                    table_seeds=5),
}

#: Environment variable overriding the active profile's ``table_seeds``.
ENV_TABLE_SEEDS = "HQDIT_TABLE_SEEDS"


class ProfileError(ValueError):
    """An unknown profile name (argument or ``$HQDIT_PROFILE``) or a bad ``$HQDIT_TABLE_SEEDS``."""


def profile(name: str | None = None) -> Profile:
    """The active profile: ``name`` if given, else ``$HQDIT_PROFILE``, else ``"book"``.

    Raises:
        ProfileError: an unknown name (the message says where it came from and lists the names), or a
            ``$HQDIT_TABLE_SEEDS`` that is not an integer >= 2.
    """
    origin = "profile" if name else "$HQDIT_PROFILE"
    name = name or os.environ.get("HQDIT_PROFILE", "book")
    try:
        prof = PROFILES[name]
    except KeyError:
        fix = "e.g. HQDIT_PROFILE=ci, or unset it for book" if origin != "profile" else "e.g. profile='ci'"
        raise ProfileError(f"unknown {origin} {name!r}: choose one of {sorted(PROFILES)} ({fix})") from None
    override = os.environ.get(ENV_TABLE_SEEDS)
    if override:
        try:
            n = int(override)
        except ValueError:
            raise ProfileError(f"${ENV_TABLE_SEEDS} must be an integer >= 2; got {override!r}") from None
        if n < 2:
            raise ProfileError(f"${ENV_TABLE_SEEDS} must be >= 2 (a paired interval needs two seeds); got {n}")
        prof = replace(prof, table_seeds=n)
    return prof
