"""Ask for a size: keep a given fraction of the non-embedding parameters, allocated across sites by one global rule.

1. Sensitivity: each site alone (the others intact) is cut to a ladder of unit counts (its dendrogram, so any fiber
   mode works) and collapsed the way the search would collapse it (compensated where it refits). ``sensitivity=
   "loss"`` measures the eval loss increase on the search examples (sites × ladder full evaluations);
   ``"block"`` the relative error of the block's output on carried block inputs (``block_search``: one pass,
   linear in depth).
2. Allocation: for a price λ per parameter, each site takes the count minimizing ΔL_s(k) + λ·P_s(k); bisecting λ
   finds the allocation that fits the budget. The one site whose count changes at the final λ gets an interpolated
   count, so the total lands on the target (a site's parameters are affine in its unit count).
3. Apply: sites are collapsed in forward order at their counts (calibration taken from the model as it stands), and
   the report gives the search-set and held-out losses.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_fibration.config import FibrationConfig
from hf_fibration.core.fibers import FiberPartition, relabel
from hf_fibration.core.report import CompressionReport
from hf_fibration.evaluation.evalset import EvalSet, evaluate_loss, examples_loss
from hf_fibration.models.sites import Site, build_sites
from hf_fibration.models.surgery import get_module, linear_weight, non_embedding_parameters
from hf_fibration.pipeline.loop import calibrate, collapse_sites, finish_report, start_report
from hf_fibration.policies.block_search import site_error_curves
from hf_fibration.policies.bound import search_and_holdout
from hf_fibration.repair.calibration import refitter

LADDER = (0.75, 0.5, 0.35, 0.25, 0.15, 0.08)


@dataclass
class SiteCurve:
    """A site's measured trade-off: unit counts, the site's parameters at each, and the loss increase."""

    name: str
    counts: list[int]
    params: list[int]
    increase: list[float]

    def choose(self, price: float) -> int:
        return min(range(len(self.counts)), key=lambda i: self.increase[i] + price * self.params[i])

    def params_at(self, count: int) -> int:
        """Parameters at any count, interpolated between measured ones (exactly affine for every site kind)."""
        (c0, p0), (c1, p1) = (self.counts[0], self.params[0]), (self.counts[-1], self.params[-1])
        return round(p0 + (p1 - p0) * (count - c0) / (c1 - c0)) if c1 != c0 else p0

    def count_for(self, params: int) -> int:
        (c0, p0), (c1, p1) = (self.counts[0], self.params[0]), (self.counts[-1], self.params[-1])
        if p1 == p0:
            return c0
        return max(1, min(c0, round(c0 + (c1 - c0) * (params - p0) / (p1 - p0))))


def compress_to_target(model: nn.Module, config: FibrationConfig, evalset: EvalSet, progress: bool = True,
                       holdout: EvalSet | None = None, holdout_losses: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> CompressionReport:
    """Compress ``model`` in place to ``config.target_params`` of its non-embedding parameters (within 1%);
    ``holdout_losses``: the model's per-example losses on ``holdout`` as it comes, when the caller has them."""
    evalset, holdout = search_and_holdout(evalset, holdout, config.holdout_fraction, config.seed, holdout_losses)
    config = copy.copy(config)
    config.parts = tuple(p for p in config.parts if p != "embeddings")  # the target counts non-embedding params
    if not config.parts:
        raise ValueError("target_params counts non-embedding parameters: include 'attention' or 'mlp' in parts.")
    before = non_embedding_parameters(model)
    holdout_base = None if holdout is None else evaluate_loss(model, holdout) if holdout_losses is None else \
        float(holdout_losses[0].sum() / holdout_losses[1].sum())
    sites = _target_sites(model, config)
    if config.sensitivity == "block":
        examples: list = []
        curves = _block_curves(model, config, evalset, sites, progress, examples)
        base = examples_loss(examples, evalset) if examples else evaluate_loss(model, evalset)
    else:
        base = evaluate_loss(model, evalset)
        curves = [_curve(model, config, site, evalset, base) for site in
                  tqdm(sites, desc="site sensitivity", disable=not progress, unit="site")]
    counts = allocate(curves, before - round(config.target_params * before))
    report = start_report(model, base)
    report.holdout_base_loss = holdout_base

    def to_count(site: Site, dendrogram) -> tuple[FiberPartition, float] | None:
        count = counts[site.name]
        if count >= site.units(model):
            return None
        return dendrogram.cut_to_count(count), float(dendrogram.epsilon_for_count(count))

    report.layers = collapse_sites(model, config, _target_sites(model, config), to_count, evalset, progress)
    return finish_report(model, report, evalset, holdout)


def _target_sites(model: nn.Module, config: FibrationConfig) -> list[Site]:
    """The sites, less the row merges of an MLP's output projection: its size depends on the MLP's own cut too,
    which the per-site curves cannot see (every other site owns its modules alone)."""
    sites = build_sites(model, config)
    mlp_modules = {m for s in sites if s.kind == "mlp" for m in s.modules}
    return [s for s in sites if not (s.kind == "rows" and s.modules[0] in mlp_modules)]


def allocate(curves: list[SiteCurve], saving: int) -> dict[str, int]:
    """Unit counts per site that save ``saving`` parameters at the least summed loss increase (Lagrangian)."""
    full = {c.name: c.counts[0] for c in curves}
    if saving <= 0:
        return full

    def saved(price: float) -> tuple[int, dict[str, int]]:
        picks = {c.name: c.choose(price) for c in curves}
        return sum(c.params[0] - c.params[picks[c.name]] for c in curves), picks

    lo, hi = 0.0, 1.0
    while saved(hi)[0] < saving and hi < 1e12:
        hi *= 4
    for _ in range(100):
        mid = (lo + hi) / 2
        if saved(mid)[0] >= saving:
            hi = mid
        else:
            lo = mid
    _, under = saved(lo)
    _, over = saved(hi)
    counts = {c.name: c.counts[under[c.name]] for c in curves}
    short = saving - sum(c.params[0] - c.params[under[c.name]] for c in curves)
    # Interpolate the sites that move between the two allocations until the shortfall is covered.
    for c in sorted(curves, key=lambda c: c.params[under[c.name]] - c.params[over[c.name]], reverse=True):
        if short <= 0:
            break
        if over[c.name] == under[c.name]:
            continue
        now = c.params[under[c.name]]
        target = max(c.params[over[c.name]], now - short)
        counts[c.name] = c.count_for(target)
        short -= now - c.params_at(counts[c.name])
    if short > 0:  # every site at the price's choice: cut the cheapest-per-parameter sites further
        for c in sorted(curves, key=lambda c: c.increase[-1] / max(c.params[0] - c.params[-1], 1)):
            if short <= 0:
                break
            now = c.params_at(counts[c.name])
            target = max(c.params[-1], now - short)
            counts[c.name] = c.count_for(target)
            short -= now - c.params_at(counts[c.name])
    return counts


def _block_curves(model: nn.Module, config: FibrationConfig, evalset: EvalSet, sites: list[Site],
                  progress: bool, examples: list) -> list[SiteCurve]:
    """Each site's curve from the relative block-output error of its cuts (``block_search.site_error_curves``,
    which puts the per-example base losses in ``examples`` when its pass covers the eval set); sites outside the
    blocks (none here: embeddings are not counted) keep their full width."""
    measured = site_error_curves(model, config, evalset, sites, progress, by_count=True, keep_refits=False,
                                 examples=examples)
    curves = []
    for site in sites:
        cuts = measured.get(site.name) or []
        counts, params, increase = [site.units(model)], [site.params(model)], [0.0]
        for cut in sorted(cuts, key=lambda c: c["partition"].num_fibers, reverse=True):
            counts.append(cut["partition"].num_fibers)
            params.append(cut["params"])
            increase.append(max(cut["error"], increase[-1]))
        curves.append(SiteCurve(site.name, counts, params, increase))
    return curves


def _curve(model: nn.Module, config: FibrationConfig, site: Site, evalset: EvalSet, base: float) -> SiteCurve:
    units = site.units(model)
    counts = [units] + sorted({max(1, round(f * units)) for f in LADDER} - {units}, reverse=True)
    params, increase = [site.params(model)], [0.0]
    calibration = calibrate(model, config, site, evalset)
    dendro = site.dendrogram(model, config, calibration)
    refit = refitter(calibration, config, many_cuts=True)
    for count in counts[1:]:
        site.apply(model, dendro.cut_to_count(count), refit)
        params.append(site.params(model))
        increase.append(evaluate_loss(model, evalset) - base)
    site.restore(model)
    site.commit()
    for i in range(1, len(increase)):  # fewer units never count as better: a dip below is eval noise
        increase[i] = max(increase[i], increase[i - 1])
    return SiteCurve(site.name, counts, params, increase)


def compress_uniform(model: nn.Module, config: FibrationConfig, evalset: EvalSet, progress: bool = True,
                     holdout: EvalSet | None = None) -> CompressionReport:
    """Compress ``model`` in place to ``config.target_params`` of its non-embedding parameters with ONE MLP width k
    for every layer (each MLP site's dendrogram cut to k fibers, compensated as the config says) and attention,
    residual stream and embeddings untouched: what a family's own config expresses (``plain.to_plain``). k is the
    count whose parameters come nearest the target (every MLP site's parameters are affine in its width)."""
    evalset, holdout = search_and_holdout(evalset, holdout, config.holdout_fraction, config.seed)
    config = copy.copy(config)
    config.parts = ("mlp",)
    sites = [s for s in build_sites(model, config) if s.kind == "mlp"]
    if not sites:
        raise ValueError("The model has no MLP to compress to one width.")
    before = non_embedding_parameters(model)
    per_unit = sum(_unit_cost(model, s) for s in sites)
    fixed = before - sum(s.units(model) * _unit_cost(model, s) for s in sites)  # all but the MLPs' widths
    count = min(min(s.units(model) for s in sites), round((config.target_params * before - fixed) / per_unit))
    if count < 1:
        floor = (fixed + per_unit) / before
        raise ValueError(f"One MLP width keeps attention and embeddings whole: the smallest such model keeps "
                         f"{floor:.3f} of the non-embedding parameters (one MLP unit); pass --target-params "
                         f"{math.ceil(floor * 1000) / 1000} or more.")
    report = start_report(model, evaluate_loss(model, evalset))
    report.holdout_base_loss = None if holdout is None else evaluate_loss(model, holdout)

    def to_width(site: Site, dendrogram) -> tuple[FiberPartition, float] | None:
        if count >= site.units(model):
            return None
        return _exact_count(dendrogram, count), float(dendrogram.epsilon_for_count(count))

    report.layers = collapse_sites(model, config, sites, to_width, evalset, progress, f"collapse to {count} units")
    return finish_report(model, report, evalset, holdout)


def _unit_cost(model: nn.Module, site: Site) -> int:
    """Parameters one MLP unit owns: a row (and bias) of each input projection and a column of the output one."""
    cost = 0
    for name in site.modules_in():
        weight, bias = linear_weight(get_module(model, name))
        cost += weight.shape[1] + (bias is not None)
    return cost + linear_weight(get_module(model, site.modules[-1]))[0].shape[0]


def _exact_count(dendro, count: int) -> FiberPartition:
    """The cut to exactly ``count`` fibers: ``cut_to_count`` when it gets there, else (tied merge heights) the
    dendrogram's merges taken in order up to that count."""
    partition = dendro.cut_to_count(count)
    if partition.num_fibers != count and getattr(dendro, "linkage", None) is not None:
        from scipy.cluster.hierarchy import cut_tree

        labels = cut_tree(dendro.linkage, n_clusters=count).ravel()
        partition = FiberPartition(relabel(labels), dendro._scales(labels))
    if partition.num_fibers != count:
        raise ValueError(f"The MLP fibers cannot be cut to exactly {count} units with this fiber source; pass "
                         "--fibers-from weights.")
    return partition
