"""Former name of :mod:`hf_fibration.quantizer` (the from_pretrained loader); kept so old imports work."""

from .quantizer import (  # noqa: F401
    LOAD_HINT,
    QUANT_METHOD,
    FibrationQuantizationConfig,
    FibrationQuantizer,
    mark_compressed,
    register,
)
