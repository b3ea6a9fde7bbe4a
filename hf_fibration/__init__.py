"""hf-fibration: compress Hugging Face transformers by fibration symmetry."""

from .config import FibrationConfig
from .core import CompressionReport, FiberLinear, compress_lstm, compress_sequential

__version__ = "0.1.0"

__all__ = ["CompressionReport", "FiberLinear", "FibrationConfig", "compress_lstm", "compress_sequential"]
