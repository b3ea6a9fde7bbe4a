"""The public entry point for transformers models."""

from __future__ import annotations

from torch import nn

from .config import FibrationConfig
from .core.report import CompressionReport
from .hub import mark_compressed
from .patch import compress_with_epsilons


def compress_pretrained(model: nn.Module, config: FibrationConfig | None = None) -> CompressionReport:
    """Compress a transformers model in place by fibration symmetry and return the per-layer report.

    Every attention projection, MLP and (optionally) the embedding is collapsed at the ε the config fixes
    (``epsilon`` or ``epsilons``). The model stays a ``PreTrainedModel``: ``save_pretrained`` writes a
    checkpoint that ``from_pretrained`` loads after ``import hf_fibration``.
    """
    config = config or FibrationConfig(epsilon=0.0)
    if config.epsilon is None and not config.epsilons:
        raise ValueError("Set FibrationConfig(epsilon=...) or epsilons={...} for a fixed-ε compression.")
    _check_finite(model)
    report = compress_with_epsilons(model, config)
    mark_compressed(model, config.to_dict(), report.to_dict())
    return report


def _check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(p.isfinite().all()):
            raise ValueError(f"Parameter {name} holds NaN or inf values; fix the checkpoint before compressing.")
