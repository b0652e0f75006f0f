"""Atomic file writes: a file is either absent or complete, never half-written.

Every long job of the package (training checkpoints, sample shards, calibrations, cached runs, exports)
writes through :func:`atomic_path`: the data go to a temporary name beside the target, private to this
process and thread, which is renamed onto the target (``os.replace``, atomic on POSIX) only once written.
A job killed mid-write leaves at most a stray ``*.tmp<pid>-<thread>*`` file, which nothing ever reads.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "write_text_atomic"]


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
