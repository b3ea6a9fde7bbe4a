"""The public entry points for transformers models: compress in place, publish."""

from __future__ import annotations

import torch
from torch import nn

from hf_fibration.config import FibrationConfig
from hf_fibration.core.report import CompressionReport
from hf_fibration.evaluation.evalset import EvalSet, build_eval_set
from hf_fibration.integrations.publish import push_to_hub
from hf_fibration.integrations.quantizer import mark_compressed
from hf_fibration.pipeline.loop import compress_with_epsilons
from hf_fibration.pipeline.offload import streamed_blocks
from hf_fibration.policies.lossless import compress_lossless_config
from hf_fibration.policies.search import greedy_search
from hf_fibration.policies.target import compress_to_target

__all__ = ["compress_pretrained", "push_to_hub"]


def compress_pretrained(
    model: nn.Module,
    config: FibrationConfig | None = None,
    *,
    evalset: EvalSet | None = None,
    tokenizer=None,
    dataset=None,
    progress: bool = True,
    layer_losses: bool = False,
    base_loss: float | None = None,
    base_model: str | None = None,
    holdout: EvalSet | None = None,
    holdout_losses: tuple[torch.Tensor, torch.Tensor] | None = None,
    execution_device: str | torch.device | None = None,
) -> CompressionReport:
    """Compress a transformers model in place by fibration symmetry and return the per-layer report.

    With a fixed ε for every part (``FibrationConfig(epsilon=...)``) no data is needed; with data, a fixed-ε run
    costs the dendrograms, the calibration of the compensated refits and one evaluation before and one after
    (``base_loss`` skips the first); ``layer_losses=True`` evaluates after every layer instead. Otherwise the
    greedy search picks, layer by layer, the largest ε whose eval loss stays ≤ base·(1+τ); the eval data is
    ``evalset``, or ``dataset`` (a `datasets.Dataset`) tokenized with ``tokenizer``, or — with only a
    tokenizer — the small eval set packaged with hf-fibration. The model stays a ``PreTrainedModel``:
    ``save_pretrained`` writes a checkpoint that ``from_pretrained`` loads after ``import hf_fibration``, and
    ``hf_fibration.push_to_hub`` publishes it with a model card. ``base_model`` (a hub id or path) records what
    it was compressed from (default: what it was loaded from). The search confirms its bound on ``holdout`` (default:
    a ``config.holdout_fraction`` of the eval data that it then never uses otherwise); ``holdout_losses`` are the
    model's per-example losses on ``holdout`` when the caller has them (``evaluate_loss(..., examples=)``, joined by
    ``join_examples``): the search skips that evaluation. With ``execution_device``
    (e.g. ``"cuda"`` for a model loaded on the CPU), the blocks rest where the model is and run one at a time on
    that device (``pipeline.offload``): a model larger than the device's memory compresses."""
    config = config or FibrationConfig()
    _check_finite(model)
    fixed = config.is_fixed
    if evalset is None and tokenizer is not None and (not fixed or dataset is not None):
        evalset = build_eval_set(model, tokenizer, dataset, batch_size=config.eval_batch_size,
                                 max_length=config.max_length, seed=config.seed,
                                 max_samples=config.max_eval_samples)
    if execution_device is not None and config.block_error == "fisher":
        raise ValueError("block_error='fisher' needs a backward pass through resident blocks; offloaded compression "
                         "(execution_device) prices block errors with block_error='relative'.")
    if execution_device is not None:
        evalset, holdout = (None if e is None else e.to(execution_device) for e in (evalset, holdout))
    with streamed_blocks(model, execution_device):
        report = _compress(model, config, evalset, progress, layer_losses, base_loss, holdout, holdout_losses)
    mark_compressed(model, config.to_dict(), report.to_dict(), base_model=base_model)
    return report


def _compress(model: nn.Module, config: FibrationConfig, evalset: EvalSet | None, progress: bool,
              layer_losses: bool, base_loss: float | None, holdout: EvalSet | None,
              holdout_losses: tuple[torch.Tensor, torch.Tensor] | None) -> CompressionReport:
    fixed = config.is_fixed
    if config.lossless:
        report = compress_lossless_config(model, config, evalset)
    elif config.target_params is not None:
        if evalset is None:
            raise ValueError("A target size is allocated by measured loss: pass tokenizer= (and optionally dataset=) "
                             "or evalset=.")
        report = compress_to_target(model, config, evalset, progress=progress, holdout=holdout,
                                    holdout_losses=holdout_losses)
    elif evalset is None:
        if not fixed:
            raise ValueError("The ε search needs eval data: pass tokenizer= (and optionally dataset=) or evalset=, "
                             "or fix ε with FibrationConfig(epsilon=...).")
        report = compress_with_epsilons(model, config)
    elif fixed and not layer_losses:
        report = compress_with_epsilons(model, config, evalset, base_loss)
    else:
        report = greedy_search(model, config, evalset, progress=progress, holdout=holdout,
                               holdout_losses=holdout_losses)
    return report


FINITE_CHECK_CHUNK = 1 << 20  # values checked at a time


def _check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        # a chunk at a time: isfinite's temporaries (|x| among them) are a chunk, not a copy of the weight
        if p.is_floating_point() and not all(bool(chunk.isfinite().all()) for chunk in p.detach().reshape(-1)
                                             .split(FINITE_CHECK_CHUNK)):
            raise ValueError(f"Parameter {name} holds NaN or inf values; fix the checkpoint before compressing.")
