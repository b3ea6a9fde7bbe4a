"""The public entry point for transformers models."""

from __future__ import annotations

from torch import nn

from .config import FibrationConfig
from .core.report import CompressionReport
from .data import EvalSet, build_eval_set
from .hub import mark_compressed
from .patch import compress_with_epsilons
from .search import greedy_search


def compress_pretrained(
    model: nn.Module,
    config: FibrationConfig | None = None,
    *,
    evalset: EvalSet | None = None,
    tokenizer=None,
    dataset=None,
    progress: bool = True,
) -> CompressionReport:
    """Compress a transformers model in place by fibration symmetry and return the per-layer report.

    With a fixed ε for every part (``FibrationConfig(epsilon=...)``) no data is needed. Otherwise the greedy
    search picks, layer by layer, the largest ε whose eval loss stays ≤ base·(1+τ); the eval data is
    ``evalset``, or ``dataset`` (a `datasets.Dataset`) tokenized with ``tokenizer``, or — with only a
    tokenizer — the small eval set packaged with hf-fibration. The model stays a ``PreTrainedModel``:
    ``save_pretrained`` writes a checkpoint that ``from_pretrained`` loads after ``import hf_fibration``.
    """
    config = config or FibrationConfig()
    _check_finite(model)
    fixed = config.epsilon is not None or all(p in config.epsilons for p in config.parts)
    if evalset is None and tokenizer is not None and (not fixed or dataset is not None):
        evalset = build_eval_set(model, tokenizer, dataset, batch_size=config.eval_batch_size,
                                 max_length=config.max_length, seed=config.seed,
                                 max_samples=config.max_eval_samples)
    if evalset is None:
        if not fixed:
            raise ValueError("The ε search needs eval data: pass tokenizer= (and optionally dataset=) or evalset=, "
                             "or fix ε with FibrationConfig(epsilon=...).")
        report = compress_with_epsilons(model, config)
    else:
        report = greedy_search(model, config, evalset, progress=progress)
    mark_compressed(model, config.to_dict(), report.to_dict())
    return report


def _check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(p.isfinite().all()):
            raise ValueError(f"Parameter {name} holds NaN or inf values; fix the checkpoint before compressing.")
