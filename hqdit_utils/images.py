"""Image batches as the package stores them: uint8 NHWC arrays (:func:`check_images`) and ADM-format ``.npz``
files read batch by batch (:class:`NpzImages`).

A ``.npz`` image batch (the ADM evaluator's format, ``guided-diffusion/evaluations``) holds uint8 NHWC images
``[N, H, W, C]`` (values 0..255) in ``arr_0``. Arrays are read with ``allow_pickle=False`` semantics (object
arrays are refused) and streamed from the zip archive, so a 50,000-image 256² batch (9.8 GB) never sits in
memory whole. This module is the ground floor both the samplers (checking a finished sample file) and the
metrics (reading sample and reference batches) stand on.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


def check_images(images, channels: int | None = None, what: str = "images") -> np.ndarray:
    """Validate an image batch and return it as a numpy array.

    Args:
        images: uint8 array (or tensor) ``[N, H, W, C]`` — NHWC, values 0..255, ``C`` in {1, 3}.
        channels: the channel count the caller requires, or ``None`` for 1 or 3.
        what: how to call the array in error messages.

    Returns:
        the images as a ``np.uint8`` array ``[N, H, W, C]`` (no copy when already one).

    Raises:
        TypeError: the dtype is not uint8 (the message shows the value range and how to convert).
        ValueError: not 4-D, NCHW-looking, an unsupported channel count, or no images.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    x = np.asarray(images)
    if x.dtype != np.uint8:
        if x.size and x.dtype.kind in "fiub" and np.isfinite(x).all():
            lo, hi = x.min(), x.max()
            hint = (
                " — this looks like images in [-1, 1]: convert with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)"
                if lo < 0 and hi <= 1
                else " — this looks like images in [0, 1]: convert with (x * 255).round().clip(0, 255).astype(np.uint8)"
                if lo >= 0 and hi <= 1
                else ""
            )
            raise TypeError(f"{what} must be uint8 with values 0..255; got {x.dtype} with range [{lo}, {hi}]{hint}")
        raise TypeError(f"{what} must be uint8 with values 0..255; got dtype {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"{what} must be a 4-D NHWC array [N, H, W, C]; got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: empty batch (0 images)")
    allowed = (1, 3) if channels is None else (channels,)
    if x.shape[-1] not in allowed:
        nchw = x.shape[1] in allowed and x.shape[-1] not in (1, 3)
        hint = "; it looks like NCHW — transpose with x.transpose(0, 2, 3, 1)" if nchw else ""
        raise ValueError(f"{what} must be NHWC with {' or '.join(map(str, allowed))} channels; got shape {x.shape}{hint}")
    return x



class NpzImages:
    """The ``arr_0`` (or ``key``) image array of an ``.npz``, validated from its header and read in batches.

    Attributes:
        path: the file.
        shape: ``(N, H, W, C)``.
    """

    def __init__(self, path: str | Path, key: str = "arr_0"):
        self.path = Path(path)
        self.key = key
        check_npz(self.path)
        with self._open() as f:
            self.shape, fortran, dtype = self._read_header(f)
        where = f"{self.path}:{key}"
        if dtype != np.uint8:
            raise TypeError(f"{where} must hold uint8 images (0..255); it holds {dtype}. Convert float images in "
                            "[-1, 1] with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8) and save them with "
                            "metrics.adm.save_samples")
        if fortran:
            raise ValueError(f"{where} is stored in Fortran order; save it C-contiguous (np.ascontiguousarray)")
        # Shape, emptiness and channel checks, on a zero-copy stand-in with the same shape.
        check_images(np.broadcast_to(np.zeros((), np.uint8), self.shape), what=where)

    def _open(self):
        archive = zipfile.ZipFile(self.path)
        name = f"{self.key}.npy"
        if name not in archive.namelist():
            keys = sorted(n[:-4] for n in archive.namelist() if n.endswith(".npy"))
            archive.close()
            raise KeyError(f"{self.path} has no array {self.key!r} (it has {keys}); ADM batches store images in 'arr_0'")
        return _ClosingMember(archive, archive.open(name))

    @staticmethod
    def _read_header(f):
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # 3.0 only differs for structured dtypes with non-latin-1 field names
            raise ValueError(f"unsupported .npy format version {version} (images are written as 1.0)")
        if dtype.hasobject:
            raise TypeError("arrays of Python objects are not accepted (they would need allow_pickle=True)")
        return tuple(shape), fortran, dtype

    def __len__(self) -> int:
        return self.shape[0]

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield uint8 ``[≤batch_size, H, W, C]`` batches in file order."""
        per_image = int(np.prod(self.shape[1:]))
        with self._open() as f:
            self._read_header(f)
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                data = f.read(count * per_image)
                if len(data) != count * per_image:
                    raise ValueError(f"{self.path}:{self.key} is truncated (ends inside image {start + len(data) // per_image})")
                yield np.frombuffer(bytearray(data), dtype=np.uint8).reshape(count, *self.shape[1:])  # writable

    def read(self) -> np.ndarray:
        """All images, ``[N, H, W, C]`` uint8."""
        return np.concatenate(list(self.iter_batches(max(len(self), 1))))


def check_npz(path: Path) -> None:
    """``FileNotFoundError`` / ``ValueError`` unless ``path`` is an existing ``.npz`` (zip) archive."""
    if not path.is_file():
        raise FileNotFoundError(f"no such .npz file: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz archive (write batches with np.savez / save_samples)")


class _ClosingMember:
    """A zip member opened for reading that also closes its archive."""

    def __init__(self, archive: zipfile.ZipFile, member):
        self.archive, self.member = archive, member

    def read(self, n: int = -1) -> bytes:
        # ZipExtFile.read(n) may return fewer bytes than asked; loop until n or EOF.
        if n < 0:
            return self.member.read()
        chunks, got = [], 0
        while got < n:
            chunk = self.member.read(n - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.member.close()
        self.archive.close()
