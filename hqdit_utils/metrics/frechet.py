"""Fréchet distance between Gaussians, and feature statistics accumulated batch by batch.

FID and sFID are the same computation on different features: fit a Gaussian (mean ``mu`` [D],
covariance ``sigma`` [D, D]) to the features of each image set and take

    d² = |mu1 - mu2|² + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 · sigma2)^½)

(units: squared feature units; FID is reported as this d², not its square root). The numerics follow
the ADM evaluator (``guided-diffusion/evaluations/evaluator.py``, itself from TTUR's ``fid.py``):
``scipy.linalg.sqrtm`` of the product; if that square root is not finite (the product is singular),
retry with ``eps · I`` added to both covariances; a complex result whose diagonal has an imaginary
part above 1e-3 is an error, a smaller one is numerical noise and is dropped. The covariance is the
unbiased one (``np.cov``, divisor N - 1), as in the evaluator.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

#: Diagonal offset (feature units²) added to both covariances when ``sigma1 · sigma2`` is singular.
SINGULAR_OFFSET = 1e-6
#: Largest imaginary part tolerated on the diagonal of ``sqrtm(sigma1 · sigma2)``.
IMAGINARY_TOLERANCE = 1e-3


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = SINGULAR_OFFSET) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1, mu2: means, shape ``[D]``.
        sigma1, sigma2: covariances, shape ``[D, D]`` (symmetric positive semi-definite).
        eps: diagonal offset used only if the product of the covariances is singular.

    Returns:
        the distance as a Python float (squared feature units), >= 0 up to rounding.

    Raises:
        ValueError: mismatched or malformed shapes, non-finite statistics, or a square root with a
            significant imaginary part (the covariances are not positive semi-definite).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be vectors of the same length; got shapes {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"covariances must be [{d}, {d}] to match the means; got {sigma1.shape} and {sigma2.shape} "
            "(were the two sets of statistics made by different feature extractors or layers?)"
        )
    for name, arr in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or infinite values; the features it was computed from are broken")

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"Fréchet distance: sigma1 · sigma2 is singular; adding {eps} to the diagonal of both covariances",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_TOLERANCE):
            raise ValueError(
                f"sqrtm(sigma1 · sigma2) has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}: "
                "the covariances are not positive semi-definite (too few samples for the feature dimension?)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class FeatureStats:
    """Mean and covariance of feature vectors, accumulated over any number of batches in float64.

    Batches are merged with the pairwise update of Chan, Golub & LeVeque (per batch: its mean and
    centred scatter matrix; merging adds the scatter plus ``n_a n_b / n · δδᵀ``), which does not lose
    precision when the mean is large compared with the spread, so the result does not depend on how
    the features were split into batches (up to float64 rounding, ~1e-15 relative).

    Example::

        stats = FeatureStats()
        for batch in batches:          # each [B, D]
            stats.update(batch)
        stats.mean, stats.cov, stats.n  # [D], [D, D] (divisor n - 1, like np.cov), int
    """

    def __init__(self) -> None:
        self.n = 0
        self._mean: np.ndarray | None = None
        self._scatter: np.ndarray | None = None  # sum of (x - mean)(x - mean)^T, [D, D]

    @property
    def dim(self) -> int | None:
        """Feature dimension D, or ``None`` before the first batch."""
        return None if self._mean is None else self._mean.shape[0]

    def update(self, features) -> "FeatureStats":
        """Add a batch ``[B, D]`` (any float dtype; B may be 0). Returns ``self``.

        Raises:
            ValueError: wrong rank, a dimension different from earlier batches, or NaN/inf features.
        """
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be a 2-D array [batch, dim]; got shape {x.shape}")
        if self._mean is not None and x.shape[1] != self._mean.shape[0]:
            raise ValueError(f"feature dimension changed from {self._mean.shape[0]} to {x.shape[1]} between batches")
        if x.shape[0] == 0:
            return self
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).any(axis=1).sum())
            raise ValueError(f"{bad} of {x.shape[0]} feature vectors contain NaN or inf (broken images or feature network)")
        nb = x.shape[0]
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        scatter_b = centred.T @ centred
        if self._mean is None:
            self.n, self._mean, self._scatter = nb, mean_b, scatter_b
            return self
        n = self.n + nb
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (nb / n)
        self._scatter = self._scatter + scatter_b + np.outer(delta, delta) * (self.n * nb / n)
        self.n = n
        return self

    @classmethod
    def from_features(cls, features, batch_size: int | None = None) -> "FeatureStats":
        """Statistics of ``features`` [N, D], fed in batches of ``batch_size`` rows (default: all at once)."""
        features = np.asarray(features)
        if features.ndim != 2:
            raise ValueError(f"features must be a 2-D array [N, dim]; got shape {features.shape}")
        stats = cls()
        step = batch_size or max(len(features), 1)
        for start in range(0, len(features), step):
            stats.update(features[start : start + step])
        return stats

    def _require(self, minimum: int) -> None:
        if self.n < minimum:
            raise ValueError(f"feature statistics need at least {minimum} vectors; got {self.n}")

    @property
    def mean(self) -> np.ndarray:
        """Mean feature vector ``[D]`` (float64)."""
        self._require(1)
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance ``[D, D]`` (float64, divisor n - 1, as ``np.cov(x, rowvar=False)``)."""
        self._require(2)
        return self._scatter / (self.n - 1)

    def frechet_distance(self, other: "FeatureStats") -> float:
        """:func:`frechet_distance` between these statistics and ``other``'s."""
        return frechet_distance(self.mean, self.cov, other.mean, other.cov)
