"""hf-fibration: compress Hugging Face transformers by fibration symmetry.

Importing the package registers the ``fibration`` quantization method with transformers, so compressed
checkpoints load with plain ``AutoModel*.from_pretrained``.
"""

from hf_fibration import _startup  # noqa: F401, I001  (first: Ctrl-C while the CLI imports torch prints one line)
from hf_fibration.methods import fiber_sources  # noqa: F401  (registers the built-in fibers_from choices)
from hf_fibration.api import compress_pretrained, push_to_hub
from hf_fibration.config import FibrationConfig
from hf_fibration.core import CompressionReport, FiberLinear, compress_lstm, compress_sequential
from hf_fibration.core.breaking import break_symmetry
from hf_fibration.core.lossless import compress_lossless
from hf_fibration.core.opfibers import symmetries
from hf_fibration.research.emergence import FibrationCallback, SymmetryLogger
from hf_fibration.policies.lossless import compress_lossless_pretrained, rank
from hf_fibration.integrations.quantizer import FibrationQuantizationConfig, register

register()

__version__ = "0.1.0"

__all__ = [
    "CompressionReport", "FiberLinear", "FibrationConfig", "FibrationQuantizationConfig", "compress_lstm",
    "compress_pretrained", "compress_sequential", "push_to_hub",
    "FibrationCallback", "SymmetryLogger", "break_symmetry", "compress_lossless", "compress_lossless_pretrained",
    "rank", "symmetries",
]
