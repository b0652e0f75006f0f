"""Files: atomic writes, sha256 checksums, and why a ``torch.load`` refused a file.

Atomic writes — a file is either absent or complete, never half-written. Every long job of the package
(training checkpoints, sample shards, calibrations, cached runs, exports) writes through
:func:`atomic_path`: the data go to a temporary name beside the target, private to this process and
thread, which is renamed onto the target (``os.replace``, atomic on POSIX) only once written. A job
killed mid-write leaves at most a stray ``*.tmp<pid>-<thread>*`` file, which nothing ever reads.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "write_text_atomic", "write_json_atomic", "sha256_file", "load_error_reason"]


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


def write_json_atomic(path: "str | os.PathLike", obj) -> None:
    """``obj`` as indented JSON (non-JSON values written with ``str``), atomically."""
    write_text_atomic(path, json.dumps(obj, indent=1, default=str))


def sha256_file(path: "str | os.PathLike", chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte pieces (1 MiB: no full copy in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def load_error_reason(err: BaseException) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused a file: pickled objects other than
    tensors are named as such (never loaded: unpickling them could run code), other errors by type and
    first line (truncated zip, …)."""
    if type(err).__name__ == "UnpicklingError":
        return ("it holds pickled Python objects other than tensors and plain values, which are refused unread "
                "(unpickling them could run code)")
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
