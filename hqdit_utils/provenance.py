"""What produced a result: this package's version, other packages' versions, machine, device, profile —
recorded beside every number. The one place that asks ``importlib.metadata`` for versions."""
from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Iterable

import pandas as pd
import torch

from .config import profile

__version__ = "0.1.0"

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


def cpu_description() -> str:
    """CPU model and PyTorch's CPU capability, e.g. ``"AMD EPYC, AVX2"``: chapters 6–8 run several times
    faster on a CPU with AVX512 than on one with AVX2 only, so a time without its CPU means little."""
    return f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}"


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


def environment_report() -> pd.DataFrame:
    """:func:`environment` as a one-column table for the book."""
    return pd.DataFrame.from_dict(environment(), orient="index", columns=["value"])
