"""Files: atomic writes, strict JSON, sha256 checksums (of a file, of a model's tensors), and why a ``torch.load``
refused a file.

Atomic writes — a file is either absent or complete, never half-written. Every long job of the package
(training checkpoints, sample shards, calibrations, cached runs, exports) writes through
:func:`atomic_path`: the data go to a temporary name beside the target, private to this process and
thread, which is renamed onto the target (``os.replace``, atomic on POSIX) only once written. A job
killed mid-write leaves at most a stray ``*.tmp<pid>-<thread>*`` file, which nothing ever reads.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "write_text_atomic", "strict_json", "write_json_atomic", "sha256_file", "load_error_reason",
           "state_dict_sha256", "MANIFEST", "IntegrityError", "file_digests", "write_manifest", "verify_files"]

#: The file of a folder that lists every other file's sha256 and size (:func:`write_manifest`).
MANIFEST = "MANIFEST.json"


class IntegrityError(ValueError):
    """A file listed in a folder's manifest is missing, or its size or sha256 differs (damaged or changed)."""


@contextmanager
def atomic_path(path: "str | os.PathLike") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` with the same suffix (``np.savez`` keeps a ``.npz`` name as
    it is); on normal exit it replaces ``path``, on an exception it is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}-{threading.get_ident()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: "str | os.PathLike", text: str) -> None:
    """``Path(path).write_text(text)``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _finite_or_none(v):
    """``v`` with every non-finite float (NaN, ±inf) replaced by ``None``, in nested dicts, lists and tuples."""
    if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_or_none(x) for x in v]
    return v


def strict_json(obj, indent: int | None = 1) -> str:
    """``obj`` as strict JSON (RFC 8259): NaN and ±inf written as ``null``, other non-JSON values with ``str``.
    Every JSON file and JSON line the package writes goes through here, so none holds a bare ``NaN``."""
    return json.dumps(_finite_or_none(obj), indent=indent, default=str, allow_nan=False)


def write_json_atomic(path: "str | os.PathLike", obj) -> None:
    """``obj`` as indented strict JSON (:func:`strict_json`), atomically."""
    write_text_atomic(path, strict_json(obj))


def sha256_file(path: "str | os.PathLike", chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte pieces (1 MiB: no full copy in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(folder: "str | os.PathLike", skip: tuple[str, ...] = (MANIFEST,)) -> dict:
    """``{relative path: {"sha256": hex, "bytes": size}}`` of every file under ``folder`` (recursively, sorted),
    except names in ``skip`` and the temporary files of :func:`atomic_path`."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip and ".tmp" not in p.name}


def write_manifest(folder: "str | os.PathLike", record: dict | None = None) -> dict:
    """Write ``folder/MANIFEST.json``: ``record`` plus ``files`` (:func:`file_digests`) and ``total_bytes``,
    atomically; returns what it wrote."""
    files = file_digests(folder)
    record = {**(record or {}), "files": files, "total_bytes": sum(f["bytes"] for f in files.values())}
    write_text_atomic(Path(folder) / MANIFEST, strict_json(record) + "\n")
    return record


def verify_files(folder: "str | os.PathLike", files: dict) -> None:
    """Check every ``{relative path: {"sha256", "bytes"}}`` of ``files`` (a manifest's) against ``folder``.

    Raises:
        IntegrityError: one line naming the first file that is missing, of another size, or of another sha256.
    """
    folder = Path(folder)
    for rel, info in files.items():
        p = folder / rel
        if not p.is_file():
            raise IntegrityError(f"{p} is listed in {folder / MANIFEST} but missing")
        size = p.stat().st_size
        if "bytes" in info and size != info["bytes"]:
            raise IntegrityError(f"{p} has {size} bytes, {MANIFEST} says {info['bytes']}: the file is truncated or "
                                 "was changed after it was written")
        if sha256_file(p) != info["sha256"]:
            raise IntegrityError(f"{p} fails its sha256 check ({MANIFEST}): the file was damaged or changed after "
                                 "it was written")


def state_dict_sha256(module) -> str:
    """Hex sha256 of a ``torch.nn.Module``'s parameters and buffers (names, dtypes, shapes and bytes, in key
    order): the package's one encoding of a model's identity (``tests/test_package_layout.py`` holds it)."""
    import torch  # deferred: the rest of this module is the standard library only

    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_error_reason(err: BaseException) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused a file: pickled objects other than
    tensors are named as such (never loaded: unpickling them could run code), other errors by type and
    first line (truncated zip, …)."""
    if type(err).__name__ == "UnpicklingError":
        return ("it holds pickled Python objects other than tensors and plain values, which are refused unread "
                "(unpickling them could run code)")
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
