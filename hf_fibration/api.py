"""The public entry points for transformers models: compress in place, publish."""

from __future__ import annotations

from torch import nn

from . import calibration as cal
from .config import FibrationConfig
from .core.modules import count_parameters
from .core.report import CompressionReport
from .data import EvalSet, batch_loss_sum, build_eval_set, evaluate_loss
from .lossless_glue import compress_lossless_config
from .patch import build_sites, compress_with_epsilons, layer_report, non_embedding_parameters
from .publish import push_to_hub
from .quantizer import mark_compressed
from .search import greedy_search
from .target import compress_to_target

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
    a ``config.holdout_fraction`` of the eval data that it then never uses otherwise)."""
    config = config or FibrationConfig()
    _check_finite(model)
    fixed = config.epsilon is not None or all(p in config.epsilons for p in config.parts)
    if evalset is None and tokenizer is not None and (not fixed or dataset is not None):
        evalset = build_eval_set(model, tokenizer, dataset, batch_size=config.eval_batch_size,
                                 max_length=config.max_length, seed=config.seed,
                                 max_samples=config.max_eval_samples)
    if config.lossless:
        report = compress_lossless_config(model, config, evalset)
    elif config.target_params is not None:
        if evalset is None:
            raise ValueError("A target size is allocated by measured loss: pass tokenizer= (and optionally dataset=) "
                             "or evalset=.")
        report = compress_to_target(model, config, evalset, progress=progress, holdout=holdout)
    elif evalset is None:
        if not fixed:
            raise ValueError("The ε search needs eval data: pass tokenizer= (and optionally dataset=) or evalset=, "
                             "or fix ε with FibrationConfig(epsilon=...).")
        report = compress_with_epsilons(model, config)
    elif fixed and not layer_losses and config.fibers_from == "weights":
        report = _compress_fixed(model, config, evalset, base_loss)
    else:
        report = greedy_search(model, config, evalset, progress=progress, holdout=holdout)
    mark_compressed(model, config.to_dict(), report.to_dict(), base_model=base_model)
    return report


def _compress_fixed(model: nn.Module, config: FibrationConfig, evalset: EvalSet, base_loss: float | None
                    ) -> CompressionReport:
    """Every site at its fixed ε, with the compensated refit of MLP consumers; two evaluations in all."""
    report = CompressionReport(params_before=count_parameters(model),
                               non_embedding_params_before=non_embedding_parameters(model))
    report.base_loss = evaluate_loss(model, evalset) if base_loss is None else base_loss
    for site in build_sites(model, config):
        eps = config.epsilon_for(site.part, site.name)
        if eps is None:
            continue
        embedding = site.kind == "embedding"
        units = site.units(model)
        params_before = model.get_input_embeddings().weight.numel() if embedding else site.params(model)
        partition = site.dendrogram(model, config).cut(eps)
        if partition.is_trivial:
            site.commit()
            continue
        calibration = None
        if site.kind == "mlp" and config.compensate:
            calibration = cal.capture_calibration(model, site, lambda i: batch_loss_sum(model, evalset, i),
                                                  len(evalset.batches), config.calibration_tokens)
        site.apply(model, partition, cal.refitter(calibration, config))
        site.commit()
        layer = layer_report(model, site, partition, eps, units, params_before)
        if embedding:
            layer.params_after = model.get_input_embeddings().weight.numel()
        report.layers.append(layer)
    report.final_loss = evaluate_loss(model, evalset)
    report.params_after = count_parameters(model)
    report.non_embedding_params_after = non_embedding_parameters(model)
    return report


def _check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(p.isfinite().all()):
            raise ValueError(f"Parameter {name} holds NaN or inf values; fix the checkpoint before compressing.")
