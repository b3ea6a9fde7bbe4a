"""hf-fibration: compress Hugging Face transformers by fibration symmetry.

Importing the package registers the ``fibration`` quantization method with transformers, so compressed
checkpoints load with plain ``AutoModel*.from_pretrained``.
"""

from .api import compress_pretrained, push_to_hub
from .config import FibrationConfig
from .core import CompressionReport, FiberLinear, compress_lstm, compress_sequential
from .quantizer import FibrationQuantizationConfig, register

register()

__version__ = "0.1.0"

__all__ = [
    "CompressionReport", "FiberLinear", "FibrationConfig", "FibrationQuantizationConfig", "compress_lstm",
    "compress_pretrained", "compress_sequential", "push_to_hub",
]
