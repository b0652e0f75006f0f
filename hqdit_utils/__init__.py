"""hqdit_utils — FP4 post-training quantization of Diffusion Transformers (HQ-DiT, reproduced).

The data flow is one line, and every arrow is a function in one module::

    load_dit (models) -> calibrate (calibration) -> quantize_ (qmodel: format_select, clipping, hadamard,
    gptq -> qlinear) -> sample (sampling) -> evaluate (metrics) -> run (experiments) -> notebooks / CLI

(calibration samples trajectories with ``sampling``, so both sit below ``quantize_``.) The import graph
has no cycle (``tests/test_package_layout.py``). The public surface, as torchao exports ``quantize_``::

    from hqdit_utils import load_dit, calibrate, get_recipe, quantize_, sample, evaluate
"""
from .calibration import calibrate
from .formats import FloatFormat, IntFormat, NoFormat, parse_format
from .metrics.adm import evaluate
from .models import load_dit
from .provenance import __version__
from .qmodel import quantize_
from .quantizer import fake_quantize
from .recipes import get_recipe
from .sampling import sample

__all__ = ["load_dit", "calibrate", "get_recipe", "quantize_", "sample", "evaluate", "FloatFormat", "IntFormat",
           "NoFormat", "parse_format", "fake_quantize", "__version__"]
