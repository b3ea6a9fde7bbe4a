"""Structured baselines, merging peers and data-aware fibration at a fixed MLP width or size, through one path.

``compress_mlps``: every method reduces each MLP to ``keep`` of its units; only the choice of units (and how dropped
or merged units are treated) differs. ``compensate`` refits the consumer (down/fc2) in closed form for any method.
``compress_to_size``: every method keeps ``keep`` of the non-embedding parameters; the pruning methods prune
attention heads too (``heads.py``, scores in ``core/heads.py``), FLAP with its global adaptive structure.

Merging peers (math in ``core/merging.py``), and what differs from their papers here:

- ``model-folding`` (Wang et al., ICLR 2025): k-means on each unit's input rows and consumer column together,
  unnormalized, cluster members averaged (rows) and summed (consumer columns), then Fold-AR, the data-free
  variance repair. The papers fold BatchNorm CNNs and LLaMA; here: (1) the repair has no BatchNorm to rescale, so
  it scales the merged unit's pre-activation weights and keeps its bias (the BN shift), which is the same rescale
  of the pre-activation's fluctuation; (2) a gated MLP's unit is the (gate, up) pair: both rows and the down
  column form its feature vector, and gate and up rows are each repaired with their own correlation; (3) only
  MLP units are folded — attention heads, GQA groups and the residual stream are left whole (``compress_to_size``
  gives it the same size by the MLP width alone); (4) Lloyd's k-means with k-means++ seeding stands in for
  the paper's Hartigan k-means (the LLaMA code of the paper uses Ward clustering instead; the PCA it applies
  first is a rotation and changes no Euclidean distance); (5) every MLP is folded to the same fraction, where
  the paper's LLaMA recipe sets a ratio per layer.
- ``zipit`` (Stoica et al., 2023): within one model, units matched greedily by the Pearson correlation of their
  activations on the calibration tokens (complete linkage, α = 0.3 as in ZipIt!'s code), each group merged into
  its average (rows averaged, consumer columns summed). ZipIt! merges the features of two models and zips pairs;
  within one model, reaching 10% of the units needs groups, so the greedy merge runs on merged groups too (which
  is what its matching code does when the budget allows). Its activations are the MLP's hidden units
  (act(gate)·up for a gated MLP); no BatchNorm reset follows (there is none).

Ablations that isolate what the peers change relative to the paper's fibration (colored in-weights, cosine,
agglomerative): ``fibration-inout`` (cosine on the in-rows and the consumer column, each normalized — the
covers view, fibers ∩ opfibers, made approximate), ``fibration-kmeans`` (k-means on the normalized colored
in-rows) and ``fibration-repair`` (the paper's fibers plus the Fold-AR repair).
"""

from __future__ import annotations

import torch
from torch import nn

from .afde_glue import afde_dendrogram
from .calibration import capture_inputs, compensate_mlp, original_hidden
from .config import FibrationConfig
from .core.compensate import SpanDendrogram, activation_fibers, importance
from .core.fibers import FiberDendrogram, FiberPartition, colored_in_weights
from .core.heads import flap_allocation, uniform_allocation
from .core.merging import (
    activation_correlation,
    fold_repair_scales,
    folding_features,
    inout_rows,
    kmeans,
    zipit_labels,
)
from .core.modules import count_parameters
from .core.report import CompressionReport, LayerReport
from .core.selection import keep_top
from .data import EvalSet, batch_loss_sum
from .heads import HeadSite, consumer_of, flap_scores, prunable_sites, prune_heads, shift_bias, unit_cost
from .patch import build_sites, get_module, linear_weight, non_embedding_parameters
from .quantizer import mark_compressed

PRUNING = ("random", "l1", "l2", "magnitude", "wanda-sp", "flap")
MERGING = ("model-folding", "zipit")
FIBRATION = ("fibration-weights", "fibration-activations", "fibration-span", "fibration-afde")
ABLATIONS = ("fibration-inout", "fibration-kmeans", "fibration-repair")
METHODS = PRUNING + MERGING + FIBRATION + ABLATIONS
REPAIRED = ("model-folding", "fibration-repair")


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
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must lie in (0, 1], got {keep}.")
    generator = torch.Generator().manual_seed(seed)
    config = FibrationConfig(parts=("mlp",), linkage=linkage)
    report = CompressionReport(params_before=count_parameters(model),
                               non_embedding_params_before=non_embedding_parameters(model))
    for site in [s for s in build_sites(model, config) if s.kind == "mlp"]:
        k = max(1, round(keep * site.units(model)))
        report.layers.append(_compress_mlp(model, site, method, k, calibration, compensate, max_tokens, linkage, ridge,
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

    - The pruning methods prune attention heads too (with ``attention``; scores in ``core.heads.head_scores``, the
      step in ``heads.prune_heads``). FLAP allocates by its global adaptive structure: every head and MLP unit of
      every layer in one ranking of its per-layer standardized fluctuation score, kept while it fits the budget
      (``core.heads.flap_allocation``). The others use one fraction for every attention and every MLP, the MLP
      width absorbing the rounding of the integer head counts (``core.heads.uniform_allocation``).
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
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must lie in (0, 1], got {keep}.")
    heads = attention and method in PRUNING
    sites = prunable_sites(model, heads)
    before = non_embedding_parameters(model)
    target = round(keep * before)
    units = [s.units(model) for s in sites]
    costs = [unit_cost(model, s) for s in sites]
    widths = [0 if get_module(model, consumer_of(s)).bias is not None or not (compensate or method == "flap")
              else linear_weight(get_module(model, consumer_of(s)))[0].shape[0] for s in sites]  # biases to add
    scores = flap_scores(model, sites, calibration, max_tokens) if method == "flap" else None
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
            layer = prune_heads(model, site, method, k, calibration, compensate=compensate, max_tokens=max_tokens,
                                ridge=ridge, generator=generator)
        else:
            layer = None if k >= site.units(model) else _compress_mlp(
                model, site, method, k, calibration, compensate, max_tokens, linkage, ridge, seed, generator)
        if layer is not None:
            report.layers.append(layer)
    report.params_after = count_parameters(model)
    report.non_embedding_params_after = non_embedding_parameters(model)
    mark_compressed(model, {"method": method, "keep": keep, "compensate": compensate, "target": "non_embedding",
                            "parts": ["attention", "mlp"] if heads else ["mlp"], **fractions}, report.to_dict())
    return report


def _compress_mlp(model: nn.Module, site, method: str, k: int, calibration: EvalSet, compensate: bool,
                  max_tokens: int, linkage: str, ridge: float, seed: int, generator: torch.Generator) -> LayerReport:
    """Reduce one MLP site to ``k`` units by ``method``, calibrating on the model as it stands."""
    x = capture_inputs(model, site, lambda i: batch_loss_sum(model, calibration, i), len(calibration.batches),
                       max_tokens)
    hidden = original_hidden(site, model, x)
    n = hidden.shape[1]
    modules = site.originals(model)
    down = linear_weight(modules[site.modules[-1]])[0].cpu()
    in_rows = [colored_in_weights(*linear_weight(modules[m])) for m in site.modules_in()]
    up_rows = torch.cat(in_rows, 1)
    params_before = site.params(model)
    if method in PRUNING:
        partition = keep_top(importance(method, up_rows, down, hidden, generator), k)
    elif method in ("fibration-weights", "fibration-repair"):
        partition = FiberDendrogram(up_rows, linkage).cut_to_count(k)
    elif method in ("model-folding", "zipit", "fibration-kmeans", "fibration-inout"):
        partition = _merging_partition(method, in_rows, down, hidden, k, linkage, seed)
    elif method == "fibration-afde":  # ε-FDE blocks with the path metric of the calibration inputs
        partition = afde_dendrogram(site, model, x).cut_to_count(k)
    elif method == "fibration-activations":
        partition = activation_fibers(hidden, importance("flap", up_rows, down, hidden), k, linkage)[0]
    else:  # fibers_from="span", the same fibers
        partition = SpanDendrogram(hidden, down).cut_to_count(k)
    site.apply(model, partition)  # a partition with a fold (activations, span) sets the consumer's columns
    if method in REPAIRED:
        _repair(site, model, modules, partition.labels)
    if compensate:
        compensate_mlp(site, model, x, ridge)
    elif method == "flap":
        _flap_bias(site, model, partition.labels, hidden, down)
    site.commit()
    return LayerReport(site.name, n, partition.num_fibers, 0.0, params_before, site.params(model))


def _merging_partition(method: str, in_rows: list[torch.Tensor], down: torch.Tensor, hidden: torch.Tensor, k: int,
                       linkage: str, seed: int) -> FiberPartition:
    if method == "model-folding":
        labels = kmeans(folding_features(in_rows, down), k, seed=seed)
    elif method == "zipit":
        labels = zipit_labels(activation_correlation(hidden), k)
    elif method == "fibration-kmeans":
        labels = kmeans(_unit_rows(torch.cat(in_rows, 1)), k, seed=seed)
    else:
        return FiberDendrogram(inout_rows(torch.cat(in_rows, 1), down), linkage).cut_to_count(k)
    return FiberPartition(labels, torch.ones(labels.numel(), dtype=torch.float64))


def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.to(torch.float64)
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)


@torch.no_grad()
def _repair(site, model: nn.Module, originals: dict[str, nn.Module], labels: torch.Tensor) -> None:
    """Fold-AR on each input projection of the merged units: its weight rows (not its bias) times the repair."""
    for name in site.modules_in():
        scales = fold_repair_scales(linear_weight(originals[name])[0].cpu(), labels)
        layer = get_module(model, name)
        layer.weight.mul_(scales.to(layer.weight)[:, None])


@torch.no_grad()
def _flap_bias(site, model: nn.Module, labels: torch.Tensor, hidden: torch.Tensor, down: torch.Tensor) -> None:
    """FLAP's own compensation: the mean output of the removed units moves into the consumer's bias."""
    removed = labels < 0
    if not bool(removed.any()):
        return
    shift_bias(model, site.modules[-1], down[:, removed].to(torch.float64) @ hidden[:, removed].mean(0))
