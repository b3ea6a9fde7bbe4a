"""Structured baselines, merging peers and data-aware fibration at a fixed MLP width or size, through one path.

``compress_mlps``: every method reduces each MLP to ``keep`` of its units; only the choice of units (and how dropped
or merged units are treated) differs. ``compensate`` refits the consumer (down/fc2) in closed form for any method.
``compress_to_size``: every method keeps ``keep`` of the non-embedding parameters; the pruning methods prune
attention heads too (``heads.py``, scores in ``core/heads.py``), FLAP with its global adaptive structure.

The methods, each one registration (partition, repair, bias shift, head score), and the merging peers' notes
are in ``baseline_methods``; this module is the one loop that runs them.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_fibration.config import FibrationConfig
from hf_fibration.core.fibers import colored_in_weights
from hf_fibration.core.heads import flap_allocation, uniform_allocation
from hf_fibration.core.modules import count_parameters
from hf_fibration.core.report import CompressionReport, LayerReport
from hf_fibration.evaluation.evalset import EvalSet, batch_loss_sum
from hf_fibration.integrations.quantizer import mark_compressed
from hf_fibration.methods.baseline_methods import BASELINE_METHODS, KINDS, BaselineMethod, SiteContext
from hf_fibration.models.heads import HeadSite, consumer_of, prunable_sites, prune_heads, unit_cost
from hf_fibration.models.sites import Site, build_sites
from hf_fibration.models.surgery import get_module, linear_weight, non_embedding_parameters
from hf_fibration.repair.calibration import capture_inputs, compensate_mlp, original_hidden

METHODS = tuple(BASELINE_METHODS)  # the built-in methods; BASELINE_METHODS also holds those registered later
PRUNING, MERGING, FIBRATION, ABLATIONS = (tuple(m.name for m in BASELINE_METHODS.values() if m.kind == kind)
                                          for kind in KINDS)
REPAIRED = tuple(m.name for m in BASELINE_METHODS.values() if m.repair is not None)


def compress_mlps(
    model: nn.Module,
    method: str,
    keep: float,
    calibration: EvalSet,
    *,
    compensate: bool = False,
    max_tokens: int = 8192,
    linkage: str = "average",
    ridge: float = 1e-3,
    seed: int = 0,
) -> CompressionReport:
    """Reduce every MLP of ``model`` (in place, layer by layer, calibrating on the model as compressed so far).

    The model is marked as compressed, so ``save_pretrained`` writes a checkpoint that ``from_pretrained`` loads
    once ``hf_fibration`` is imported."""
    spec = _method(method, keep)
    generator = torch.Generator().manual_seed(seed)
    config = FibrationConfig(parts=("mlp",), linkage=linkage)
    report = CompressionReport(params_before=count_parameters(model),
                               non_embedding_params_before=non_embedding_parameters(model))
    for site in [s for s in build_sites(model, config) if s.kind == "mlp"]:
        k = max(1, round(keep * site.units(model)))
        report.layers.append(_compress_mlp(model, site, spec, k, calibration, compensate, max_tokens, linkage, ridge,
                                           seed, generator))
    report.params_after = count_parameters(model)
    report.non_embedding_params_after = non_embedding_parameters(model)
    mark_compressed(model, {"method": method, "keep": keep, "compensate": compensate, "parts": ["mlp"]},
                    report.to_dict())
    return report


def compress_to_size(
    model: nn.Module,
    method: str,
    keep: float,
    calibration: EvalSet,
    *,
    attention: bool = True,
    compensate: bool = False,
    max_tokens: int = 8192,
    linkage: str = "average",
    ridge: float = 1e-3,
    seed: int = 0,
) -> CompressionReport:
    """Keep ``keep`` of the non-embedding parameters (within 1%), split across attention heads and MLP units.

    - The pruning methods (those with a ``head_score``) prune attention heads too (with ``attention``; scores in
      ``core.heads.head_scores``, the step in ``heads.prune_heads``). FLAP (its ``global_scores``) allocates by its
      global adaptive structure: every head and MLP unit of every layer in one ranking of its per-layer
      standardized fluctuation score, kept while it fits the budget (``core.heads.flap_allocation``). The others
      use one fraction for every attention and every MLP, the MLP width absorbing the rounding of the integer head
      counts (``core.heads.uniform_allocation``).
    - Model Folding, ZipIt!, the fibration modes and the ablations leave attention heads whole: their papers merge
      channels (on a transformer, the MLP's) and merging heads is not built here. They reduce the MLPs alone, to
      the width that gives the same non-embedding size.

    Every site keeps at least one unit; a GQA model loses whole key/value groups (a key/value head with its query
    heads). Sites are compressed in forward order, each calibrated on the model as compressed so far; FLAP's counts
    come from one pass through the uncompressed model (where FLAP computes all its statistics), the units it keeps
    within a site from the model as it stands. ``compensate`` refits each consumer (down/fc2 and the attention's
    output projection) in closed form; without it FLAP adds the mean contribution of the removed channels to the
    consumer's bias, creating one on families without it (Llama and Mistral o_proj and down_proj, Qwen2 o_proj) as
    FLAP does on LLaMA. Added biases count toward the size. The model is marked as compressed (``save_pretrained``
    then ``from_pretrained`` after ``import hf_fibration``)."""
    spec = _method(method, keep)
    heads = attention and spec.head_score is not None
    sites = prunable_sites(model, heads)
    before = non_embedding_parameters(model)
    target = round(keep * before)
    units = [s.units(model) for s in sites]
    costs = [unit_cost(model, s) for s in sites]
    widths = [linear_weight(get_module(model, consumer_of(s)))[0].shape[0] if _adds_bias(model, s, spec, compensate)
              else 0 for s in sites]
    scores = None if spec.global_scores is None else spec.global_scores(model, sites, calibration, max_tokens)
    counts, fractions = list(units), {}
    for _ in range(2):  # plan without added biases, then again with those of the sites the first plan reduces
        fixed = before - sum(c * n for c, n in zip(costs, units, strict=True)) + sum(
            w for w, k, n in zip(widths, counts, units, strict=True) if k < n)
        if scores is not None:
            counts = flap_allocation(scores, costs, target - fixed)
        else:
            counts, f, g = uniform_allocation(units, costs, [isinstance(s, HeadSite) for s in sites], target - fixed)
            fractions = {"head_fraction": f if heads else 1.0, "mlp_fraction": g}
    planned = fixed + sum(c * k for c, k in zip(costs, counts, strict=True))
    if abs(planned - target) > 0.01 * target:
        only = "" if heads else " (it reduces MLP units only)"
        raise ValueError(f"{method} cannot keep {keep:.1%} of the non-embedding parameters; the nearest size it "
                         f"reaches is {planned / before:.1%}{only}.")
    generator = torch.Generator().manual_seed(seed)
    report = CompressionReport(params_before=count_parameters(model), non_embedding_params_before=before)
    for site, k in zip(sites, counts, strict=True):
        if isinstance(site, HeadSite):
            layer = prune_heads(model, site, spec.head_score, k, calibration, compensate=compensate,
                                max_tokens=max_tokens, ridge=ridge, generator=generator)
        else:
            layer = None if k >= site.units(model) else _compress_mlp(
                model, site, spec, k, calibration, compensate, max_tokens, linkage, ridge, seed, generator)
        if layer is not None:
            report.layers.append(layer)
    report.params_after = count_parameters(model)
    report.non_embedding_params_after = non_embedding_parameters(model)
    mark_compressed(model, {"method": method, "keep": keep, "compensate": compensate, "target": "non_embedding",
                            "parts": ["attention", "mlp"] if heads else ["mlp"], **fractions}, report.to_dict())
    return report


def _method(name: str, keep: float) -> BaselineMethod:
    if name not in BASELINE_METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(BASELINE_METHODS)}.")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must lie in (0, 1], got {keep}.")
    return BASELINE_METHODS[name]


def _adds_bias(model: nn.Module, site: HeadSite | Site, spec: BaselineMethod, compensate: bool) -> bool:
    """Whether reducing ``site`` creates its consumer's bias: the refit's, or FLAP's own compensation."""
    if get_module(model, consumer_of(site)).bias is not None:
        return False
    return compensate or (spec.head_score == "flap" if isinstance(site, HeadSite) else spec.bias_shift is not None)


def _compress_mlp(model: nn.Module, site: Site, spec: BaselineMethod, k: int, calibration: EvalSet,
                  compensate: bool, max_tokens: int, linkage: str, ridge: float, seed: int,
                  generator: torch.Generator) -> LayerReport:
    """Reduce one MLP site to ``k`` units by ``spec``, calibrating on the model as it stands."""
    x = capture_inputs(model, site, lambda i: batch_loss_sum(model, calibration, i), len(calibration.batches),
                       max_tokens)
    modules = site.originals(model)
    ctx = SiteContext(site, model, k, x, original_hidden(site, model, x), modules,
                      [colored_in_weights(*linear_weight(modules[m])) for m in site.modules_in()],
                      linear_weight(modules[site.modules[-1]])[0].cpu(), linkage, seed, generator)
    params_before = site.params(model)
    partition = spec.partition(ctx)
    site.apply(model, partition)  # a partition with a fold (activations, span) sets the consumer's columns
    if spec.repair is not None:
        spec.repair(ctx, partition)
    if compensate:
        compensate_mlp(site, model, x, ridge)
    elif spec.bias_shift is not None:
        spec.bias_shift(ctx, partition)
    site.commit()
    return LayerReport(site.name, ctx.hidden.shape[1], partition.num_fibers, 0.0, params_before, site.params(model))
