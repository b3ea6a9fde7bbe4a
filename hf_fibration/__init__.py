"""hf-fibration: compress Hugging Face transformers by fibration symmetry.

Importing the package registers the ``fibration`` quantization method with transformers, so compressed
checkpoints load with plain ``AutoModel*.from_pretrained``.
"""

from . import _startup  # noqa: F401, I001  (first: Ctrl-C while the CLI imports torch prints one line)
from . import fiber_sources  # noqa: F401  (registers the built-in fibers_from choices)
from .api import compress_pretrained, push_to_hub
from .config import FibrationConfig
from .core import CompressionReport, FiberLinear, compress_lstm, compress_sequential
from .core.breaking import break_symmetry
from .core.lossless import compress_lossless
from .core.opfibers import symmetries
from .emergence import FibrationCallback, SymmetryLogger
from .lossless_glue import compress_lossless_pretrained, rank
from .quantizer import FibrationQuantizationConfig, register

register()

__version__ = "0.1.0"

__all__ = [
    "CompressionReport", "FiberLinear", "FibrationConfig", "FibrationQuantizationConfig", "compress_lstm",
    "compress_pretrained", "compress_sequential", "push_to_hub",
    "FibrationCallback", "SymmetryLogger", "break_symmetry", "compress_lossless", "compress_lossless_pretrained",
    "rank", "symmetries",
]
