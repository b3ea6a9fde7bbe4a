"""Pure torch + scipy fibration math; no transformers import here."""

from .collapse import collapse_weight, expand_index, mean_rows, sum_rows
from .fibers import FiberDendrogram, FiberPartition, colored_in_weights, relabel, sum_columns
from .modules import FiberLinear, count_flops, count_parameters
from .report import CompressionReport, LayerReport
from .sequential import compress_lstm, compress_sequential, dendrogram_partitioner

__all__ = [
    "CompressionReport", "FiberDendrogram", "FiberLinear", "FiberPartition", "LayerReport", "collapse_weight",
    "colored_in_weights", "compress_lstm", "compress_sequential", "count_flops", "count_parameters",
    "dendrogram_partitioner", "expand_index", "mean_rows", "relabel", "sum_columns", "sum_rows",
]
