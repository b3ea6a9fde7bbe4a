"""Lossless mode on transformers models: each MLP site is reduced by the rules exact for the model's activation.

The residual stream between blocks keeps every MLP independent, so one pass over the sites is the fixed point
(it is repeated while a pass still removes units, which only tolerance effects could cause). Applied through
``Site.apply`` with a ``LosslessPartition`` (signed scales; label −1 for dropped units); constants and sigmoid
offsets are then folded into the site's output bias.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hf_fibration.config import FibrationConfig
from hf_fibration.core.lossless import (
    ACTIVATIONS,
    RULES,
    LosslessLayer,
    LosslessPartition,
    LosslessReport,
    lossless_partition,
)
from hf_fibration.core.lossless import rank as _core_rank
from hf_fibration.core.modules import count_parameters
from hf_fibration.core.report import CompressionReport, LayerReport
from hf_fibration.models.architectures import mlp_activation
from hf_fibration.models.sites import Site, build_sites
from hf_fibration.models.surgery import get_module, linear_weight, non_embedding_parameters


def mlp_sites(model: nn.Module) -> list[Site]:
    return [s for s in build_sites(model, FibrationConfig(parts=("mlp",))) if s.kind == "mlp"]


def site_partition(model: nn.Module, site: Site, rtol: float | None = None) -> LosslessPartition:
    name, fn = mlp_activation(model)
    inputs = [linear_weight(get_module(model, m)) for m in site.modules_in()]
    w_out, b_out = linear_weight(get_module(model, site.modules[-1]))
    return lossless_partition(inputs, w_out, name if name in ACTIVATIONS else "none", out_bias=b_out is not None,
                              act_fn=fn, rtol=rtol)


def compress_lossless_pretrained(
    model: nn.Module,
    *,
    rtol: float | None = None,
    batches: Iterable[dict[str, torch.Tensor]] | None = None,
    data_name: str | None = None,
) -> LosslessReport:
    """Reduce every MLP of a transformers model in place; with ``batches`` also measure max |Δ output|."""
    batches = list(batches) if batches is not None else []
    before = [_output(model, b) for b in batches]
    act = mlp_activation(model)[0]
    report = LosslessReport()
    for site in mlp_sites(model):
        units = site.units(model)
        entry = LosslessLayer(site.name, act, units, units, dict.fromkeys(RULES, 0), site.params(model))
        for _ in range(10):
            part = site_partition(model, site, rtol)
            if part.num_removed == 0:
                break
            w_out, b_out = linear_weight(get_module(model, site.modules[-1]))
            site.apply(model, part)
            site.commit()
            shift = w_out.to(torch.float64) @ part.offsets
            if b_out is not None:
                with torch.no_grad():
                    bias = get_module(model, site.modules[-1]).bias
                    bias.add_(shift.to(bias))
            entry.units_after = part.num_fibers
            for rule, n in part.removed.items():
                entry.removed[rule] += n
        entry.params_after = site.params(model)
        report.layers.append(entry)
    report.sweeps = 1
    if batches:
        after = [_output(model, b) for b in batches]
        report.max_abs_delta = max(float((x - y).abs().max()) for x, y in zip(before, after, strict=True))
        report.delta_data = data_name or f"{sum(len(b['input_ids']) for b in batches)} eval examples"
    return report


@torch.no_grad()
def _output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key).detach().to(torch.float64)
    return out[0].detach().to(torch.float64)


def rank(model: nn.Module | tuple[torch.Tensor, ...], activation: str = "tanh", *, rtol: float | None = None) -> int:
    """Hidden units left after lossless compression.

    ``(W_in, b_in, W_out)`` or an nn.Sequential with one tanh hidden layer: the rank (seed Alg. 4.2), the
    minimum number of units of any network computing the same function. Deeper nn.Sequential MLPs: the total
    width after lossless compression (an upper bound). transformers models: the MLP units left, summed over
    the blocks (the model is not modified).
    """
    if isinstance(model, nn.Module) and hasattr(model, "config") and not isinstance(model, nn.Sequential):
        return sum(site_partition(model, s, rtol).num_fibers for s in mlp_sites(model))
    return _core_rank(model, activation, rtol=rtol)


def compress_lossless_config(model: nn.Module, config: FibrationConfig, evalset=None) -> CompressionReport:
    """``FibrationConfig(lossless=True)`` through ``compress_pretrained``: the lossless report is kept as
    ``report.lossless`` (units per rule, max |Δ output| on the eval batches when given)."""
    params, non_emb = count_parameters(model), non_embedding_parameters(model)
    lossless = compress_lossless_pretrained(model, rtol=config.exact_rtol,
                                            batches=None if evalset is None else evalset.batches)
    return CompressionReport(
        layers=[LayerReport(x.name, x.units_before, x.units_after, 0.0, x.params_before, x.params_after)
                for x in lossless.layers],
        params_before=params, params_after=count_parameters(model), non_embedding_params_before=non_emb,
        non_embedding_params_after=non_emb - (params - count_parameters(model)), lossless=lossless,
    )
