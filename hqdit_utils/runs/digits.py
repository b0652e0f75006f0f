"""The embedded data set: scikit-learn's digits at 16×16, its fixed split, and its reference batch.

Both networks of the embedded model (the DiT and the proxy classifier) train on the train split; the
held-out split is the reference batch of every metric of the book. Units: images float32 NCHW
``[N, 1, 16, 16]`` in [-1, 1]; reference batches uint8 NHWC ``[N, 16, 16, 1]`` (the sampler's pixels).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..images import check_images

__all__ = ["NUM_CLASSES", "NULL_CLASS", "IMAGE_SIZE", "DATASET_NAME", "DigitsData", "load_digits16",
           "to_uint8_nhwc", "embedded_reference"]

#: Number of digit classes; the null (unconditional) class id is ``NUM_CLASSES``.
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES
IMAGE_SIZE = 16
DATASET_NAME = "sklearn.datasets.load_digits, upsampled 8x8 -> 16x16 (bilinear), scaled to [-1, 1]"


@dataclass
class DigitsData:
    """The data set in memory.

    images: float32 ``[1797, 1, 16, 16]`` in [-1, 1] (0 = background -> -1, 16 = full ink -> +1).
    labels: int64 ``[1797]`` digit 0..9.
    train_idx / heldout_idx: int64 indices of the fixed stratified split.
    """

    images: torch.Tensor
    labels: torch.Tensor
    train_idx: torch.Tensor
    heldout_idx: torch.Tensor
    split_seed: int
    heldout_fraction: float


def load_digits16(split_seed: int = 0, heldout_fraction: float = 0.2) -> DigitsData:
    """Load scikit-learn's digits, upsample to 16×16 and split (stratified, fixed seed)."""
    # deferred: scikit-learn takes seconds to import; only loading the data needs it
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # [N,1,8,8] in [0,1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp(-1.0, 1.0)
    y = torch.tensor(d.target, dtype=torch.long)
    idx = list(range(len(y)))
    tr, te = train_test_split(idx, test_size=heldout_fraction, random_state=split_seed, stratify=d.target)
    return DigitsData(x, y, torch.tensor(sorted(tr)), torch.tensor(sorted(te)), split_seed, heldout_fraction)


def to_uint8_nhwc(x: torch.Tensor) -> torch.Tensor:
    """float NCHW in [-1, 1] -> uint8 NHWC, ``round((x + 1) * 127.5)`` clamped (the sampler's rule)."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def embedded_reference(split: str = "heldout") -> np.ndarray:
    """The embedded data set's images of ``split`` as a reference batch: uint8 ``[N, 16, 16, 1]``.

    Args:
        split: ``"heldout"`` (360 images, never seen by the DiT or the proxy network) or ``"train"`` (1,437).

    The data (scikit-learn's digits upsampled to 16×16, fixed stratified split, seed 0) and its
    conversion to uint8 (the sampler's ``round((x + 1) * 127.5)``) are those of
    the training data of the embedded model, so reference and samples are quantized to pixels the same way.
    """
    data = load_digits16()
    indices = {"heldout": data.heldout_idx, "train": data.train_idx}
    if split not in indices:
        raise ValueError(f"split must be one of {sorted(indices)}; got {split!r}")
    images = to_uint8_nhwc(data.images[indices[split]]).numpy()
    return check_images(images, channels=1, what=f"embedded {split!r} images")
