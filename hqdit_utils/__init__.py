"""hqdit_utils — FP4 post-training quantization of Diffusion Transformers (HQ-DiT, reproduced).

The data flow is one line, and every arrow is a function in one module::

    load_dit -> capture -> format_select / clipping / hadamard / gptq (inside quantize_)
             -> sample -> metrics -> experiments -> notebooks / CLI
"""
from .formats import FloatFormat, IntFormat, NoFormat, parse_format
from .quantizer import fake_quantize

__version__ = "0.1.0"
__all__ = ["FloatFormat", "IntFormat", "NoFormat", "parse_format", "fake_quantize", "__version__"]
