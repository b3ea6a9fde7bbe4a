"""The methods of ``baselines.compress_mlps`` / ``compress_to_size``, each one registration in ``BASELINE_METHODS``.

A method forms the partition of one MLP site's units from a ``SiteContext`` (``keep_top``'s label −1 drops a unit,
a fiber merges its members); the loop in ``baselines`` collapses the site, runs the method's ``repair``, then the
closed-form compensation (``compensate``) or else the method's own ``bias_shift``. A pruning method that names a
``head_score`` prunes attention heads too in ``compress_to_size``. Adding a method is one partition function and
one ``register_baseline_method`` call.

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

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from hf_fibration.core.compensate import SpanDendrogram, activation_fibers, importance
from hf_fibration.core.fibers import FiberDendrogram, FiberPartition
from hf_fibration.core.merging import (
    activation_correlation,
    fold_repair_scales,
    folding_features,
    inout_rows,
    kmeans,
    zipit_labels,
)
from hf_fibration.core.selection import keep_top
from hf_fibration.evaluation.evalset import EvalSet
from hf_fibration.methods.afde_glue import afde_dendrogram
from hf_fibration.models.heads import HeadSite, flap_scores, shift_bias
from hf_fibration.models.sites import Site
from hf_fibration.models.surgery import get_module, linear_weight

KINDS = ("pruning", "merging", "fibration", "ablation")


@dataclass
class SiteContext:
    """What a method reads about the MLP site it reduces, captured on the model as compressed so far."""

    site: Site
    model: nn.Module
    k: int  # units to keep
    inputs: torch.Tensor  # calibration tokens × d_in entering the site
    hidden: torch.Tensor  # the uncompressed site's hidden units on them (tokens × units)
    originals: dict[str, nn.Module]  # the site's modules before any collapse
    in_rows: list[torch.Tensor]  # colored rows (bias as a column) of each input projection, units × (d_in + 1)
    down: torch.Tensor  # the consumer's weight (d_out × units), on the CPU
    linkage: str
    seed: int
    generator: torch.Generator

    @property
    def up_rows(self) -> torch.Tensor:
        """The in-rows of all input projections side by side (a gated MLP's unit is its (gate, up) pair)."""
        return torch.cat(self.in_rows, 1)


@dataclass(frozen=True)
class BaselineMethod:
    """One way to reduce an MLP to ``k`` units (and, for a pruning method, attention to ``k`` heads).

    ``partition(ctx)`` chooses the units; ``repair(ctx, partition)`` runs after the collapse whatever
    ``compensate`` says; ``bias_shift(ctx, partition)`` only without it, and may create the consumer's bias.
    ``kind``: one of ``KINDS`` (``baselines.PRUNING``, ``MERGING``, ...). ``calibrated``: the partition reads
    ``ctx.hidden`` / ``ctx.inputs`` (every site captures them anyway, for compensation). ``head_score``: the
    criterion of ``core.heads.head_scores`` by which ``compress_to_size`` prunes attention heads (None leaves heads
    whole). ``global_scores(model, sites, calibration, max_tokens)``: per-site unit scores that ``compress_to_size``
    ranks across the whole model (``core.heads.flap_allocation``) instead of giving every site one fraction."""

    name: str
    help: str
    partition: Callable[[SiteContext], FiberPartition]
    kind: str
    calibrated: bool = False
    repair: Callable[[SiteContext, FiberPartition], None] | None = None
    bias_shift: Callable[[SiteContext, FiberPartition], None] | None = None
    head_score: str | None = None
    global_scores: Callable[[nn.Module, list[HeadSite | Site], EvalSet, int], list[torch.Tensor]] | None = None


BASELINE_METHODS: dict[str, BaselineMethod] = {}  # name → method, in registration order


def register_baseline_method(
    name: str,
    help: str,
    partition: Callable[[SiteContext], FiberPartition],
    *,
    kind: str,
    calibrated: bool = False,
    repair: Callable[[SiteContext, FiberPartition], None] | None = None,
    bias_shift: Callable[[SiteContext, FiberPartition], None] | None = None,
    head_score: str | None = None,
    global_scores: Callable[[nn.Module, list[HeadSite | Site], EvalSet, int], list[torch.Tensor]] | None = None,
) -> BaselineMethod:
    """Make ``name`` a method of ``compress_mlps`` and ``compress_to_size`` (the fields as in ``BaselineMethod``)."""
    if name in BASELINE_METHODS:
        raise ValueError(f"A baseline method named {name!r} is already registered.")
    if kind not in KINDS:
        raise ValueError(f"Unknown kind {kind!r} for baseline method {name!r}; choose one of {', '.join(KINDS)}.")
    BASELINE_METHODS[name] = method = BaselineMethod(name, help, partition, kind, calibrated, repair, bias_shift,
                                                     head_score, global_scores)
    return method


def pruned(criterion: str, ctx: SiteContext) -> FiberPartition:
    """Keep the ``k`` units that ``core.compensate.importance`` scores highest."""
    return keep_top(importance(criterion, ctx.up_rows, ctx.down, ctx.hidden, ctx.generator), ctx.k)


def weight_fibers(ctx: SiteContext) -> FiberPartition:
    return FiberDendrogram(ctx.up_rows, ctx.linkage).cut_to_count(ctx.k)


def activation_fibers_of(ctx: SiteContext) -> FiberPartition:
    return activation_fibers(ctx.hidden, importance("flap", ctx.up_rows, ctx.down, ctx.hidden), ctx.k,
                             ctx.linkage)[0]


def span_fibers(ctx: SiteContext) -> FiberPartition:
    return SpanDendrogram(ctx.hidden, ctx.down).cut_to_count(ctx.k)


def afde_blocks(ctx: SiteContext) -> FiberPartition:
    return afde_dendrogram(ctx.site, ctx.model, ctx.inputs).cut_to_count(ctx.k)


def inout_fibers(ctx: SiteContext) -> FiberPartition:
    return FiberDendrogram(inout_rows(ctx.up_rows, ctx.down), ctx.linkage).cut_to_count(ctx.k)


def folding_clusters(ctx: SiteContext) -> FiberPartition:
    return _clusters(kmeans(folding_features(ctx.in_rows, ctx.down), ctx.k, seed=ctx.seed))


def zipit_groups(ctx: SiteContext) -> FiberPartition:
    return _clusters(zipit_labels(activation_correlation(ctx.hidden), ctx.k))


def kmeans_fibers(ctx: SiteContext) -> FiberPartition:
    rows = ctx.up_rows.to(torch.float64)
    return _clusters(kmeans(rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30), ctx.k, seed=ctx.seed))


def _clusters(labels: torch.Tensor) -> FiberPartition:
    return FiberPartition(labels, torch.ones(labels.numel(), dtype=torch.float64))


@torch.no_grad()
def fold_repair(ctx: SiteContext, partition: FiberPartition) -> None:
    """Fold-AR on each input projection of the merged units: its weight rows (not its bias) times the repair."""
    for name in ctx.site.modules_in():
        scales = fold_repair_scales(linear_weight(ctx.originals[name])[0].cpu(), partition.labels)
        layer = get_module(ctx.model, name)
        layer.weight.mul_(scales.to(layer.weight)[:, None])


@torch.no_grad()
def flap_bias(ctx: SiteContext, partition: FiberPartition) -> None:
    """FLAP's own compensation: the mean output of the removed units moves into the consumer's bias."""
    removed = partition.labels < 0
    if not bool(removed.any()):
        return
    shift = ctx.down[:, removed].to(torch.float64) @ ctx.hidden[:, removed].mean(0)
    shift_bias(ctx.model, ctx.site.modules[-1], shift)


register_baseline_method("random", "Keep k units drawn at random (seeded).", partial(pruned, "random"),
                         kind="pruning", head_score="random")
register_baseline_method("l1", "Keep the units with the largest L1 norm of their colored in-rows.",
                         partial(pruned, "l1"), kind="pruning", head_score="l1")
register_baseline_method("l2", "Keep the units with the largest L2 norm of their colored in-rows.",
                         partial(pruned, "l2"), kind="pruning", head_score="l2")
register_baseline_method("magnitude", "Keep the units with the largest ‖colored in-row‖·‖consumer column‖.",
                         partial(pruned, "magnitude"), kind="pruning", head_score="magnitude")
register_baseline_method(
    "wanda-sp", "Structured Wanda (An et al.): keep the units with the largest Σ_j |W_down[j, i]|·‖H_i‖ on the "
    "calibration tokens.", partial(pruned, "wanda-sp"), kind="pruning", calibrated=True, head_score="wanda-sp")
register_baseline_method(
    "flap", "FLAP (An et al.): keep the units with the largest fluctuation Var(H_i)·‖W_down[:, i]‖², allocated "
    "globally by size, the removed units' mean moved into the consumer's bias.", partial(pruned, "flap"),
    kind="pruning", calibrated=True, bias_shift=flap_bias, head_score="flap", global_scores=flap_scores)
register_baseline_method(
    "model-folding", "Model Folding (Wang et al.): k-means on in-rows with consumer columns, then the Fold-AR "
    "repair; no data.", folding_clusters, kind="merging", repair=fold_repair)
register_baseline_method(
    "zipit", "ZipIt! within one model: greedy merge by the correlation of the units' calibration activations.",
    zipit_groups, kind="merging", calibrated=True)
register_baseline_method(
    "fibration-weights", "The paper's fibers: colored in-weights, cosine, agglomerative; no data.", weight_fibers,
    kind="fibration")
register_baseline_method(
    "fibration-activations", "Fibers of collinear calibration activations, each folded into its best FLAP-scored "
    "member.", activation_fibers_of, kind="fibration", calibrated=True)
register_baseline_method(
    "fibration-span", "Keep the units whose output-weighted calibration activations span the others best, fold "
    "the rest into them (fibers_from='span').", span_fibers, kind="fibration", calibrated=True)
register_baseline_method(
    "fibration-afde", "ε-FDE blocks with the path metric of the calibration inputs (fibers_from='afde').",
    afde_blocks, kind="fibration", calibrated=True)
register_baseline_method(
    "fibration-inout", "Ablation: cosine fibers of the in-rows beside the consumer column (the covers view); no "
    "data.", inout_fibers, kind="ablation")
register_baseline_method(
    "fibration-kmeans", "Ablation: k-means on the normalized colored in-rows; no data.", kmeans_fibers,
    kind="ablation")
register_baseline_method(
    "fibration-repair", "Ablation: the paper's fibers, then the Fold-AR repair; no data.", weight_fibers,
    kind="ablation", repair=fold_repair)
