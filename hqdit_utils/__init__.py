"""hqdit_utils — FP4 post-training quantization of Diffusion Transformers (HQ-DiT, reproduced).

The data flow is one line, and every arrow is a function in one module::

    load_dit (models) -> calibrate (calibration) -> quantize_ (qmodel: format_select, clipping, hadamard,
    gptq -> qlinear) -> sample (sampling) -> evaluate (metrics) -> run (experiments) -> notebooks / CLI

(calibration samples trajectories with ``sampling``, so both sit below ``quantize_``.) The import graph
has no cycle (``tests/test_package_layout.py``). The public surface, as torchao exports ``quantize_``::

    from hqdit_utils import load_dit, calibrate, get_recipe, quantize_, sample, evaluate
"""
from importlib import import_module

from .engine.formats import FloatFormat, IntFormat, NoFormat, parse_format
from .engine.quantizer import fake_quantize

#: Public name -> the module that holds it.
_PUBLIC = {"load_dit": "dit.models", "calibrate": "engine.calibration", "get_recipe": "engine.recipes", "quantize_": "engine.qmodel", "load_quantized": "engine.qmodel",
           "sample": "dit.sampling", "evaluate": "metrics.adm", "__version__": "provenance"}

__all__ = ["load_dit", "calibrate", "get_recipe", "quantize_", "load_quantized", "sample", "evaluate", "FloatFormat", "IntFormat",
           "NoFormat", "parse_format", "fake_quantize", "__version__"]


def __getattr__(name: str):
    # deferred (PEP 562): importing one module of the package (a sampling worker, `hqdit --help`) must not
    # import the whole engine with pandas, scipy and safetensors; the public names load on first use
    if name in _PUBLIC:
        value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
