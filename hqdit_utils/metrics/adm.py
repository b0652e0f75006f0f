"""ADM-format image batches and the one function that turns two of them into a metrics table.

File format (the ADM evaluator's, ``guided-diffusion/evaluations``): a ``.npz`` whose ``arr_0`` holds
uint8 NHWC images ``[N, H, W, C]`` (values 0..255). Sample batches may add ``arr_1`` (class labels,
int64 ``[N]``). Reference batches such as ``VIRTUAL_imagenet256_labeled.npz`` (10,000 ImageNet images)
also carry precomputed Inception statistics ``mu`` ``[2048]``, ``sigma`` ``[2048, 2048]`` (pool_3) and
``mu_s`` ``[2023]``, ``sigma_s`` ``[2023, 2023]`` (sFID), which the evaluator prefers over recomputing
them. Everything is read with ``allow_pickle=False``; image arrays are streamed from the zip archive
batch by batch (a 50,000-image 256² batch is 9.8 GB), as the evaluator does.

:func:`evaluate` → :class:`MetricReport`: FID, sFID, IS, precision, recall, the sample counts, and the
feature network's name and weights checksum. With any network but the ADM Inception the metrics are
*proxy* metrics and their names carry a star (FID*, sFID*, IS*, P*, R*) wherever they are shown.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..files import atomic_path
from ..images import NpzImages, check_images, check_npz
from .features import FeatureExtractor
from .frechet import FeatureStats, frechet_distance
from .inception_score import inception_score
from .kid import kernel_inception_distance
from .precision_recall import precision_recall
from .sfid import spatial_features

#: Keys of precomputed reference statistics in ADM reference batches.
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
#: Images fed to the feature network at once (the ADM evaluator uses 64).
DEFAULT_BATCH_SIZE = 64
#: Where the ADM evaluator's ImageNet 256×256 reference batch is published (guided-diffusion, evaluations/).
ADM_REFERENCE_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                     "VIRTUAL_imagenet256_labeled.npz")


@dataclass
class ReferenceBatch:
    """A reference set: images and/or precomputed Inception statistics.

    Attributes:
        images: uint8 ``[N, H, W, C]`` array or :class:`NpzImages`, or ``None`` (statistics only).
        mu, sigma: pool_3 statistics ``[2048]``, ``[2048, 2048]`` (ADM Inception only), or ``None``.
        mu_s, sigma_s: sFID statistics ``[2023]``, ``[2023, 2023]``, or ``None``.
        source: where it came from (file path or description).
    """

    images: np.ndarray | NpzImages | None = None
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    source: str = "<array>"

    @property
    def has_stats(self) -> bool:
        return self.mu is not None

    @property
    def n_images(self) -> int:
        return 0 if self.images is None else len(self.images)


def load_reference(path: str | Path) -> ReferenceBatch:
    """Read an ADM reference batch (``arr_0`` images and/or ``mu, sigma, mu_s, sigma_s``).

    Raises:
        FileNotFoundError: no such file (the message says where to download the ImageNet reference batch).
        ValueError: neither images nor a complete set of statistics, or statistics of inconsistent shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference batch not found: {path}. For ImageNet 256x256 (the paper's FID/sFID protocol) download the "
            f"ADM reference batch on a machine with internet:\n    curl -L -o VIRTUAL_imagenet256_labeled.npz "
            f"{ADM_REFERENCE_URL}\nand pass its path (--reference PATH or $HQDIT_ADM_REFERENCE). For the embedded "
            "model use digits.embedded_reference('heldout') (or `hqdit reproduce --proxy` without --reference).")
    check_npz(path)
    with np.load(path, allow_pickle=False) as npz:
        keys = set(npz.files)
        present = [k for k in STAT_KEYS if k in keys]
        if present and len(present) != len(STAT_KEYS):
            raise ValueError(f"{path} has only {present} of the statistics {list(STAT_KEYS)}")
        stats = {k: np.asarray(npz[k], dtype=np.float64) for k in present}
    if "arr_0" not in keys and not stats:
        raise ValueError(f"{path} has neither images ('arr_0') nor statistics {list(STAT_KEYS)}; keys: {sorted(keys)}")
    for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if stats and (stats[mu].ndim != 1 or stats[sigma].shape != (len(stats[mu]),) * 2):
            raise ValueError(f"{path}: {mu} {stats[mu].shape} and {sigma} {stats[sigma].shape} do not form mean/covariance")
    images = NpzImages(path) if "arr_0" in keys else None
    return ReferenceBatch(images=images, source=str(path), **stats)


def load_samples(path: str | Path) -> NpzImages:
    """Open an ADM sample batch (``arr_0``: uint8 NHWC), validated from its header; read with ``.iter_batches``/``.read``."""
    return NpzImages(path)


def save_samples(path: str | Path, images, labels=None) -> Path:
    """Write an ADM sample batch atomically: ``arr_0`` = uint8 NHWC images, ``arr_1`` = labels ``[N]`` if given.

    Returns the path written. Raises like :func:`~.features.check_images` for bad images.
    """
    images = check_images(images)
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
            raise ValueError(f"labels must be integers of shape [{len(images)}]; got {labels.dtype} {labels.shape}")
        arrays["arr_1"] = labels.astype(np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)
    return path


@dataclass
class MetricReport:
    """The metrics of one sample batch against one reference.

    Attributes:
        fid: Fréchet distance of pooled features (FID), or NaN.
        sfid: Fréchet distance of spatial features (sFID), or NaN if the network has no spatial map.
        inception_score: IS of the samples (ADM splits of 5000), or NaN without logits.
        precision, recall: k=3 manifold precision/recall, or NaN without reference images.
        n_samples, n_reference: image counts (``n_reference`` is 0 for statistics-only references).
        extractor: feature network name; weights_checksum: its sha256.
        proxy: ``True`` when the network is not the ADM Inception — the names then carry a star.
        kid: Kernel Inception Distance (unbiased MMD², cubic polynomial kernel, mean over subsets;
            :mod:`.kid`) of the pooled features, or NaN without reference images.
    """

    fid: float
    sfid: float
    inception_score: float
    precision: float
    recall: float
    n_samples: int
    n_reference: int
    extractor: str
    weights_checksum: str | None
    proxy: bool
    kid: float = math.nan

    def metric_names(self) -> dict[str, str]:
        """Field → display name: ``FID``, ``sFID``, ``IS``, ``P``, ``R``, ``KID`` (each with ``*`` if proxy)."""
        star = "*" if self.proxy else ""
        return {"fid": "FID" + star, "sfid": "sFID" + star, "inception_score": "IS" + star,
                "precision": "P" + star, "recall": "R" + star, "kid": "KID" + star}

    def to_frame(self):
        """One-row ``pandas.DataFrame``: the five metrics (starred names if proxy), counts, network, checksum."""
        row = {name: getattr(self, field) for field, name in self.metric_names().items()}
        row.update({"samples": self.n_samples, "reference": self.n_reference, "extractor": self.extractor,
                    "weights sha256": self.weights_checksum})
        return pd.DataFrame([row])

    def to_dict(self) -> dict:
        """Plain dict (JSON-ready; NaN for unavailable metrics)."""
        return asdict(self)

    def footnote(self) -> str:
        """One sentence saying which network made the numbers."""
        if self.proxy:
            return (f"* proxy metrics: features from {self.extractor!r}, not the ADM Inception-v3; "
                    "compare them only with other starred numbers from the same network.")
        return "Inception-v3 (TF 2015-12-05 weights) as in the ADM evaluator: comparable with published FID/sFID/IS/P/R."


def _as_images(x) -> np.ndarray | NpzImages:
    if isinstance(x, NpzImages):
        return x
    if isinstance(x, (str, Path)):
        return NpzImages(x)
    return check_images(x)


def _batches(images, batch_size: int) -> Iterator[np.ndarray]:
    if isinstance(images, NpzImages):
        yield from images.iter_batches(batch_size)
    else:
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]


def _features(images, extractor: FeatureExtractor, batch_size: int, progress: bool, desc: str):
    """Stream ``images`` through ``extractor``: (pool [N, D] float32, pool stats, spatial stats or None, logits or None)."""
    pool, logits = [], []
    pool_stats, spatial_stats = FeatureStats(), None
    total = math.ceil(len(images) / batch_size)
    for batch in tqdm(_batches(images, batch_size), total=total, desc=desc, unit="batch", disable=not progress):
        out = extractor(batch)
        pool.append(out["pool"])
        pool_stats.update(out["pool"])
        if "spatial" in out:
            spatial_stats = (spatial_stats or FeatureStats()).update(spatial_features(out["spatial"]))
        if "logits" in out:
            logits.append(out["logits"])
    return np.concatenate(pool), pool_stats, spatial_stats, (np.concatenate(logits) if logits else None)


def evaluate(samples, reference, extractor: FeatureExtractor, batch_size: int = DEFAULT_BATCH_SIZE,
             progress: bool = False) -> MetricReport:
    """FID, sFID, IS, precision, recall and KID of ``samples`` against ``reference``, with ``extractor``'s features.

    Args:
        samples: uint8 ``[N, H, W, C]`` array, an ``.npz`` path, or :class:`NpzImages`.
        reference: :class:`ReferenceBatch`, an ``.npz`` path (:func:`load_reference`), or a uint8 image array.
        extractor: the feature network (:mod:`.features`).
        batch_size: images per forward pass (results do not depend on it).
        progress: show tqdm progress bars (stderr).

    The reference's precomputed ``mu, sigma, mu_s, sigma_s`` are used exactly when the extractor is the
    verified ADM Inception (``extractor.proxy`` is False), as the ADM evaluator does; otherwise the
    statistics are computed from the reference images. Precision/recall always need reference images.

    Raises:
        ValueError / TypeError: bad images, a reference with neither usable statistics nor images,
        fewer than 2 images on a side, or NaN features.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    samples = _as_images(samples)
    if isinstance(reference, (str, Path)):
        reference = load_reference(reference)
    elif not isinstance(reference, ReferenceBatch):
        reference = ReferenceBatch(images=_as_images(reference))
    use_stats = reference.has_stats and not extractor.proxy
    if reference.images is None and not use_stats:
        raise ValueError(
            f"reference {reference.source} has only precomputed Inception statistics, which do not apply to "
            f"{extractor.name!r}; give a reference with images ('arr_0')"
        )
    if len(samples) < 2 or (not use_stats and reference.n_images < 2):
        raise ValueError(f"need at least 2 images on each side; got {len(samples)} samples, {reference.n_images} reference")

    gen_pool, gen_stats, gen_spatial, gen_logits = _features(samples, extractor, batch_size, progress, "samples")
    ref_pool = None
    if reference.images is not None:
        ref_pool, ref_stats, ref_spatial, _ = _features(reference.images, extractor, batch_size, progress, "reference")
    if use_stats:
        fid = frechet_distance(gen_stats.mean, gen_stats.cov, reference.mu, reference.sigma)
        sfid = (frechet_distance(gen_spatial.mean, gen_spatial.cov, reference.mu_s, reference.sigma_s)
                if gen_spatial is not None else math.nan)
    else:
        fid = gen_stats.frechet_distance(ref_stats)
        sfid = gen_spatial.frechet_distance(ref_spatial) if gen_spatial is not None else math.nan
    precision, recall = precision_recall(ref_pool, gen_pool) if ref_pool is not None else (math.nan, math.nan)
    kid = kernel_inception_distance(gen_pool, ref_pool)[0] if ref_pool is not None else math.nan
    return MetricReport(
        fid=fid,
        sfid=sfid,
        inception_score=inception_score(gen_logits) if gen_logits is not None else math.nan,
        precision=precision,
        recall=recall,
        n_samples=len(samples),
        n_reference=reference.n_images,
        extractor=extractor.name,
        weights_checksum=extractor.weights_checksum,
        proxy=extractor.proxy,
        kid=kid,
    )
