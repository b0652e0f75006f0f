"""The package's typed errors that cross from one part of the package to another (ground floor: imports nothing).

A caller that reports expected errors as one line (the ``hqdit`` sub-commands) catches these without importing
the modules that raise them; each raising module re-exports its own (``from hqdit_utils.engine.qmodel import
QuantizationError`` keeps working).
"""

__all__ = ["WeightsError", "MissingWeightsError", "CalibrationError", "QuantizationError", "SamplingError"]


class WeightsError(RuntimeError):
    """Weights that are missing, damaged, or do not fit the model."""


class MissingWeightsError(WeightsError, FileNotFoundError):
    """Weights not found where they were looked for."""


class CalibrationError(ValueError):
    """Calibration failed (non-finite activations, nothing recorded, a layer pattern matching nothing)."""


class QuantizationError(ValueError):
    """Misuse of :func:`~hqdit_utils.engine.qmodel.quantize_` (already quantized, no layer selected, missing
    calibration …)."""


class SamplingError(RuntimeError):
    """An output of :func:`~hqdit_utils.dit.sampling.write_samples` that cannot be made as asked (shards of other
    settings in the way, damaged shards); the message ends with what to do."""
