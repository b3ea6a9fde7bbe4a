"""Attention heads of a transformers model as prunable units, found through the architecture table.

A ``HeadSite`` is one attention: its q, k and v projections (or GPT-2's fused ``c_attn``) and the output projection.
Pruning keeps whole units (``core.heads``: a key/value head with the query heads that share it): the kept rows of
q/k/v and the kept columns of the output projection become ``FiberLinear``s of the smaller shapes, which
``save_pretrained`` records and ``from_pretrained`` rebuilds like every compressed module. transformers' attention
reshapes by the head width, so it runs on the heads that are left; GPT-2's fused projection is split at a width
its attention module holds, which ``patch.sync_fused_widths`` sets (also when a checkpoint loads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hf_fibration.config import FibrationConfig
from hf_fibration.core.fibers import colored_in_weights
from hf_fibration.core.heads import (
    ChannelStats,
    HeadLayout,
    flap_channel_metric,
    flap_head_scores,
    head_scores,
    standardized,
)
from hf_fibration.core.modules import FiberLinear, count_parameters
from hf_fibration.core.report import LayerReport
from hf_fibration.evaluation.evalset import EvalSet, batch_loss_sum
from hf_fibration.integrations.shapes import sync_fused_widths
from hf_fibration.models.architectures import AttentionSpec, architecture_for
from hf_fibration.models.sites import Site, build_sites
from hf_fibration.models.surgery import get_module, linear_weight, model_type_of, set_module
from hf_fibration.repair.calibration import capture_calibration, refit_consumer


@dataclass
class HeadSite:
    """One attention whose heads can be pruned: module names and the head layout."""

    name: str
    projections: tuple[str, ...]  # q, k, v, or one fused qkv
    out: str
    layout: HeadLayout
    kept: torch.Tensor | None = None  # the units the last ``apply`` kept, numbered as before it

    @property
    def modules(self) -> tuple[str, ...]:
        return (*self.projections, self.out)

    @property
    def fused(self) -> bool:
        return len(self.projections) == 1

    def units(self, model: nn.Module | None = None) -> int:
        return self.layout.units

    def params(self, model: nn.Module) -> int:
        return sum(count_parameters(get_module(model, m)) for m in self.modules)

    def unit_cost(self, model: nn.Module) -> int:
        """Parameters one unit owns: its q/k/v rows (with their biases) and its output-projection columns."""
        layout = self.layout
        q_rows, kv_rows = layout.group * layout.head_dim, layout.head_dim
        per_projection = (q_rows + 2 * kv_rows,) if self.fused else (q_rows, kv_rows, kv_rows)
        cost = 0
        for name, rows in zip(self.projections, per_projection, strict=True):
            weight, bias = linear_weight(get_module(model, name))
            cost += rows * (weight.shape[1] + (bias is not None))
        return cost + q_rows * linear_weight(get_module(model, self.out))[0].shape[0]

    def rows(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The colored q, k and v rows (bias as a column), float64."""
        if not self.fused:
            q, k, v = (colored_in_weights(*linear_weight(get_module(model, p))) for p in self.projections)
            return q, k, v
        rows = colored_in_weights(*linear_weight(get_module(model, self.projections[0])))
        q_width, kv_width = self.layout.q_width, self.layout.kv_width
        return rows[:q_width], rows[q_width:q_width + kv_width], rows[q_width + kv_width:]

    def apply(self, model: nn.Module, kept: torch.Tensor) -> None:
        """Keep only the units ``kept`` (in their order): narrowed q/k/v rows and output-projection columns."""
        layout = self.layout
        kept = torch.sort(kept.long().flatten()).values
        q_idx, kv_idx = layout.query_channels(kept), layout.kv_channels(kept)
        if self.fused:
            q_width, kv_width = layout.q_width, layout.kv_width
            indices = (torch.cat([q_idx, q_width + kv_idx, q_width + kv_width + kv_idx]),)
        else:
            indices = (q_idx, kv_idx, kv_idx)
        for name, index in zip(self.projections, indices, strict=True):
            weight, bias = linear_weight(get_module(model, name))
            index = index.to(weight.device)
            set_module(model, name, FiberLinear.from_weights(weight[index].contiguous(),
                                                             None if bias is None else bias[index].contiguous()))
        weight, bias = linear_weight(get_module(model, self.out))
        set_module(model, self.out, FiberLinear.from_weights(weight[:, q_idx.to(weight.device)].contiguous(), bias))
        self.layout = HeadLayout(kept.numel() * layout.group, kept.numel(), layout.head_dim)
        self.kept = kept
        sync_fused_widths(model)


def build_head_sites(model: nn.Module) -> list[HeadSite]:
    """Every attention of ``model`` (self- and cross-attention), in forward order."""
    arch = architecture_for(model_type_of(model))
    sites = []
    for block_name, block in arch.blocks(model):
        present = {name for name, _ in block.named_modules()}
        for attn in arch.attentions:
            if all(m in present for m in (*attn.projections, attn.out)):
                sites.append(_head_site(model, block_name, attn))
    return sites


def _head_site(model: nn.Module, block_name: str, attn: AttentionSpec) -> HeadSite:
    projections = tuple(f"{block_name}.{p}" for p in attn.projections)
    owner_name = projections[0].rpartition(".")[0]
    owner = get_module(model, owner_name)
    head_dim = getattr(owner, "head_dim", None) or getattr(owner, "attention_head_size", None)
    if not head_dim:
        raise ValueError(f"Cannot read the head width of {owner_name} ({type(owner).__name__}); head pruning "
                         "supports the families of hf_fibration.models.architectures.")
    for name in (*projections, f"{block_name}.{attn.out}"):
        if getattr(get_module(model, name), "fiber_index", None) is not None:
            raise ValueError(f"{name} is already fibration-compressed; prune heads of an uncompressed model.")
    widths = [linear_weight(get_module(model, p))[0].shape[0] for p in projections]
    q_width, kv_width = (widths[0] // 3,) * 2 if len(widths) == 1 else (widths[0], widths[1])
    layout = HeadLayout(q_width // head_dim, kv_width // head_dim, int(head_dim))
    return HeadSite(owner_name, projections, f"{block_name}.{attn.out}", layout)


def prunable_sites(model: nn.Module, heads: bool = True) -> list[HeadSite | Site]:
    """Attention sites (with ``heads``) and MLP sites in forward order: a block's attentions, then its MLP."""
    mlps = [s for s in build_sites(model, FibrationConfig(parts=("mlp",))) if s.kind == "mlp"]
    if not heads:
        return mlps
    by_block: dict[str, list[HeadSite | Site]] = {}
    arch = architecture_for(model_type_of(model))
    blocks = [name for name, _ in arch.blocks(model)]
    for site in [*build_head_sites(model), *mlps]:
        block = max((b for b in blocks if site.name.startswith(b + ".")), key=len)
        by_block.setdefault(block, []).append(site)
    return [site for block in blocks for site in by_block.get(block, [])]


def consumer_of(site: HeadSite | Site) -> str:
    """The module that reads the site's units (the output projection, down/fc2)."""
    return site.out if isinstance(site, HeadSite) else site.modules[-1]


def unit_cost(model: nn.Module, site: HeadSite | Site) -> int:
    """Parameters one unit of the site owns."""
    if isinstance(site, HeadSite):
        return site.unit_cost(model)
    inputs = [linear_weight(get_module(model, m)) for m in site.modules_in()]
    out_width = linear_weight(get_module(model, site.modules[-1]))[0].shape[0]
    return sum(w.shape[1] + (b is not None) for w, b in inputs) + out_width


@torch.no_grad()
def consumer_stats(model: nn.Module, names: list[str], calibration: EvalSet, max_tokens: int
                   ) -> dict[str, ChannelStats]:
    """Channel statistics of what enters each named module, from calibration batches (until ``max_tokens``)."""
    stats: dict[str, ChannelStats] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            stats.setdefault(name, ChannelStats(args[0].shape[-1])).update(args[0])
        return record

    handles = [get_module(model, n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for i in range(len(calibration.batches)):
            batch_loss_sum(model, calibration, i)
            if len(stats) == len(names) and min(s.count for s in stats.values()) >= max_tokens:
                break
    finally:
        for handle in handles:
            handle.remove()
    return stats


def flap_scores(model: nn.Module, sites: list[HeadSite | Site], calibration: EvalSet, max_tokens: int
                ) -> list[torch.Tensor]:
    """FLAP's standardized score of every unit of every site, from one pass through the model as it stands."""
    stats = consumer_stats(model, [consumer_of(s) for s in sites], calibration, max_tokens)
    scores = []
    for site in sites:
        name = consumer_of(site)
        weight = linear_weight(get_module(model, name))[0].cpu()
        if isinstance(site, HeadSite):
            scores.append(flap_head_scores(site.layout, stats[name], weight))
        else:
            scores.append(standardized(flap_channel_metric(stats[name], weight, heads=False)))
    return scores


def prune_heads(model: nn.Module, site: HeadSite, method: str, k: int, calibration: EvalSet, *,
                compensate: bool = False, max_tokens: int = 8192, ridge: float | None = 1e-3,
                generator: torch.Generator | None = None) -> LayerReport | None:
    """Keep the ``k`` best units of ``site`` by ``method`` (``core.heads.head_scores``), calibrated on the model as
    it stands; None when all are kept. Then, with ``compensate``, the output projection is refit on the kept
    channels (closed-form ridge, validated on held-out sequences, as the MLPs' consumer); without it, ``flap``
    moves the mean contribution of the removed channels into the output projection's bias (FLAP's compensation),
    adding a bias where the family has none, as FLAP does for LLaMA."""
    layout, before = site.layout, site.params(model)
    if k >= layout.units:
        return None
    cal = None
    if method in ("wanda-sp", "flap") or compensate:
        probe = Site(site.out, "attention", "rows", (site.out,))
        cal = capture_calibration(model, probe, lambda i: batch_loss_sum(model, calibration, i),
                                  len(calibration.batches), max_tokens)
    stats = None if cal is None else ChannelStats.of(cal.inputs)
    out_w, out_b = (t if t is None else t.to(torch.float64).cpu() for t in linear_weight(get_module(model, site.out)))
    scores = head_scores(method, layout, site.rows(model), out_w, stats, generator)
    kept = torch.sort(torch.topk(scores, max(1, k)).indices).values
    site.apply(model, kept)
    channels = layout.query_channels(kept)
    note = None
    if compensate:
        target = cal.inputs @ out_w.T + (0 if out_b is None else out_b)
        note = str(refit_consumer(model, site.out, cal.inputs[:, channels], target, cal, ridge)["note"])
    elif method == "flap":
        removed = torch.ones(out_w.shape[1], dtype=torch.bool)
        removed[channels] = False
        shift_bias(model, site.out, out_w[:, removed] @ stats.mean[removed])
    return LayerReport(site.name, layout.units, kept.numel(), 0.0, before, site.params(model), compensation=note)


@torch.no_grad()
def shift_bias(model: nn.Module, name: str, shift: torch.Tensor) -> None:
    """Add ``shift`` to the named layer's bias (creating the bias where there is none)."""
    layer = get_module(model, name)
    if layer.bias is None:
        layer.bias = nn.Parameter(shift.to(layer.weight))
    else:
        layer.bias.add_(shift.to(layer.bias))
