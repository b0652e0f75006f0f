"""What produced a result: this package's version, other packages' versions, machine, device, profile —
recorded beside every number. The one place that asks ``importlib.metadata`` for versions and the one place that
reads ``/proc/cpuinfo`` (``tests/test_package_layout.py`` holds both)."""
from __future__ import annotations

import json
import os
import platform
import re
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Iterable

import torch

from .config import REPO_ROOT, profile

#: The distribution name of this package (``pyproject.toml``'s ``[project] name``).
DISTRIBUTION = "hqdit-utils"


def _own_version() -> str:
    """This package's version: its installed metadata, else (a checkout run without ``pip install``) the
    ``version`` of the ``pyproject.toml`` beside it — the one place the number is written."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
        return re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.MULTILINE).group(1)


__version__ = _own_version()

#: The one record of a cold ``make book``: each page's execution time and the machine it ran on (written by
#: ``book/_ext/chapter_times.py``, ``make chapter-times``).
CHAPTER_TIMES = REPO_ROOT / "book" / "chapter_times.json"

#: The packages :func:`environment` reports (the book's environment table).
BOOK_PACKAGES = ("torch", "torchvision", "diffusers", "torch-fidelity", "numpy", "scipy", "ml_dtypes",
                 "safetensors", "jupyter-book", "myst-nb")
#: The packages a cached run records (those that can change its numbers).
RUN_PACKAGES = ("torch", "diffusers", "numpy")


def package_versions(names: Iterable[str], missing: "str | None" = None) -> dict:
    """``{distribution name: installed version}``; a package that is not installed maps to ``missing``."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = missing
    return out


def run_versions() -> dict:
    """This package's version and :data:`RUN_PACKAGES`' (``None`` when not installed)."""
    return {"hqdit_utils": __version__, **package_versions(RUN_PACKAGES)}


def cpu_model() -> str:
    """The first ``model name`` line of ``/proc/cpuinfo``, else :func:`platform.processor`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=None)
def cpu_flags() -> "frozenset[str] | None":
    """The CPU's instruction-set flags as ``/proc/cpuinfo`` names them (e.g. ``avx512_vnni``); ``None`` where
    that file does not exist (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return frozenset(f.read().split())
    except OSError:
        return None


def cpu_kind() -> str:
    """``"AMX"``, ``"VNNI"`` (AVX512-VNNI or AVX-VNNI: int8 dot products) or ``"AVX2"`` (neither) from
    :func:`cpu_flags` (``"unknown"`` without them): the kinds of CPU the benchmarks' speed targets distinguish."""
    flags = cpu_flags()
    if flags is None:
        return "unknown"
    if "amx_int8" in flags:
        return "AMX"
    return "VNNI" if flags & {"avx512_vnni", "avx_vnni"} else "AVX2"


def cpu_description() -> str:
    """CPU model and PyTorch's CPU capability, e.g. ``"AMD EPYC, AVX2"``: chapters 6–8 run several times
    faster on a CPU with AVX512 than on one with AVX2 only, so a time without its CPU means little."""
    return f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}"


def machine_facts() -> dict:
    """The machine a time or a float result was measured on: CPU model, PyTorch's CPU capability, cores, torch,
    Python and platform (JSON-able)."""
    return {"cpu": cpu_model(), "torch cpu capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def environment() -> dict:
    """Versions and machine facts as a flat dict of strings."""
    info = {
        "hqdit_utils": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu": cpu_description(),
        "cpu cores (os.cpu_count)": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA device)",
        "HQDIT_PROFILE": profile().name,
    }
    info.update(package_versions(BOOK_PACKAGES, missing="not installed"))
    return info


def environment_report() -> "pd.DataFrame":
    """:func:`environment` as a one-column table for the book."""
    import pandas as pd  # deferred: the engine reads cpu_flags() from here and does not need pandas

    return pd.DataFrame.from_dict(environment(), orient="index", columns=["value"])


def load_chapter_times(path: "str | os.PathLike" = CHAPTER_TIMES) -> dict:
    """The content of :data:`CHAPTER_TIMES` (``{"measured", "commit", "cpu", "table_seeds", …, "pages":
    {docname: {"seconds": …}}}``), or ``{"pages": {}}`` when the file does not exist — the one reader of it."""
    path = Path(path)
    if not path.exists():
        return {"pages": {}}
    data = json.loads(path.read_text(encoding="utf-8"))
    data.setdefault("pages", {})
    return data
