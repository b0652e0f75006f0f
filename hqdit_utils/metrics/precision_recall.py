"""Improved precision and recall (Kynkäänniemi et al., 2019) with the ADM evaluator's k-NN manifolds.

Each set of feature vectors defines a manifold: the union of balls centred on its points, each ball's
radius being the distance to the point's k-th nearest neighbour *within its own set* (k = 3). Then

* **precision** = fraction of *sample* vectors inside the reference manifold (are samples realistic?);
* **recall**    = fraction of *reference* vectors inside the sample manifold (is the data covered?).

As in ADM's ``ManifoldEstimator`` (``nhood_sizes=(3,)``, no radius clamping): distances are squared
Euclidean (comparisons are the same as with distances), the k-th neighbour is the element ``k`` of the
sorted distance row, which still contains the point itself at distance 0 (so k = 3 means the third
*other* point), and a point is inside a ball when ``d² <= r²``.

Distances are computed in blocks of rows (``||u||² - 2 u·v + ||v||²``, clamped at 0) in float64, so memory
is ``O(block · N)`` instead of ``O(N²)``. ADM computes them in float16 (falling back to float32 on
overflow); points within ~0.1 % of a ball's boundary can therefore flip, which moves precision/recall
by far less than their sampling noise.
"""
from __future__ import annotations

import numpy as np

#: Neighbourhood size of the ADM evaluator.
ADM_K = 3
#: Rows of the distance matrix computed at once (memory: block · N · 8 bytes).
DEFAULT_BLOCK = 1024


def _as_features(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [N, dim]; got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or inf")
    return x


def _squared_distances(u: np.ndarray, v: np.ndarray, v_sq: np.ndarray) -> np.ndarray:
    """``[len(u), len(v)]`` squared Euclidean distances; ``v_sq`` = row norms² of ``v``."""
    d = (u * u).sum(axis=1)[:, None] - 2.0 * (u @ v.T) + v_sq[None, :]
    return np.maximum(d, 0.0, out=d)


def manifold_radii(features, k: int = ADM_K, block: int = DEFAULT_BLOCK) -> np.ndarray:
    """Squared distance of every vector to its ``k``-th nearest neighbour in the same set.

    Args:
        features: ``[N, D]``; needs ``N > k``.
        k: neighbourhood size (ADM: 3); the point itself is neighbour 0.
        block: rows of the distance matrix computed at once.

    Returns:
        float64 ``[N]`` squared radii (squared feature units).
    """
    x = _as_features(features, "features")
    if len(x) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} vectors; got {len(x)}")
    sq = (x * x).sum(axis=1)
    radii = np.empty(len(x))
    for start in range(0, len(x), block):
        d = _squared_distances(x[start : start + block], x, sq)
        radii[start : start + block] = np.partition(d, k, axis=1)[:, k]
    return radii


def _fraction_inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int) -> float:
    """Fraction of ``points`` within distance² ``radii`` of at least one of ``centres``."""
    sq = (centres * centres).sum(axis=1)
    inside = np.zeros(len(points), dtype=bool)
    for start in range(0, len(points), block):
        d = _squared_distances(points[start : start + block], centres, sq)
        inside[start : start + block] = (d <= radii[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(reference, samples, k: int = ADM_K, block: int = DEFAULT_BLOCK) -> tuple[float, float]:
    """Improved precision and recall of ``samples`` against ``reference``.

    Args:
        reference: real-data features ``[N_ref, D]`` (for Inception: pool_3, D = 2048).
        samples: generated-data features ``[N_gen, D]``.
        k: neighbourhood size of the manifolds (ADM: 3).
        block: rows of the distance matrix computed at once.

    Returns:
        ``(precision, recall)``, each in [0, 1].
    """
    ref = _as_features(reference, "reference features")
    gen = _as_features(samples, "sample features")
    if ref.shape[1] != gen.shape[1]:
        raise ValueError(f"feature dimensions differ: reference {ref.shape[1]}, samples {gen.shape[1]}")
    precision = _fraction_inside(gen, ref, manifold_radii(ref, k, block), block)
    recall = _fraction_inside(ref, gen, manifold_radii(gen, k, block), block)
    return precision, recall
