"""What produced a result: package versions, machine, device, profile — recorded beside every number."""
from __future__ import annotations

import os
import platform
from importlib import metadata

import pandas as pd
import torch

from . import __version__
from .config import profile

_PACKAGES = ["torch", "torchvision", "diffusers", "torch-fidelity", "numpy", "scipy", "ml_dtypes",
             "safetensors", "jupyter-book", "myst-nb"]


def environment() -> dict:
    """Versions and machine facts as a flat dict of strings."""
    info = {
        "hqdit_utils": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu cores (os.cpu_count)": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA device)",
        "HQDIT_PROFILE": profile().name,
    }
    for name in _PACKAGES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = "not installed"
    return info


def environment_report() -> pd.DataFrame:
    """:func:`environment` as a one-column table for the book."""
    return pd.DataFrame.from_dict(environment(), orient="index", columns=["value"])
