"""Structured baselines and data-aware fibration at a fixed MLP width, through the same patch/collapse path.

Every method reduces each MLP to ``keep`` of its units; only the choice of units (and how dropped units are
treated) differs. ``compensate`` refits the consumer (down/fc2) in closed form for any method.
"""

from __future__ import annotations

import torch
from torch import nn

from .calibration import capture_inputs, compensate_mlp, original_hidden, original_modules
from .config import FibrationConfig
from .core.compensate import activation_fibers, importance, span_representatives
from .core.fibers import FiberDendrogram, colored_in_weights
from .core.modules import count_parameters
from .core.report import CompressionReport, LayerReport
from .core.selection import keep_top
from .data import EvalSet, batch_loss_sum
from .patch import build_sites, get_module, linear_weight, non_embedding_parameters

PRUNING = ("random", "l1", "l2", "magnitude", "wanda-sp", "flap")
FIBRATION = ("fibration-weights", "fibration-activations", "fibration-span")
METHODS = PRUNING + FIBRATION


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
    """Reduce every MLP of ``model`` (in place, layer by layer, calibrating on the model as compressed so far)."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must lie in (0, 1], got {keep}.")
    generator = torch.Generator().manual_seed(seed)
    config = FibrationConfig(parts=("mlp",), linkage=linkage)
    report = CompressionReport(params_before=count_parameters(model),
                               non_embedding_params_before=non_embedding_parameters(model))
    for site in [s for s in build_sites(model, config) if s.kind == "mlp"]:
        x = capture_inputs(model, site, lambda i: batch_loss_sum(model, calibration, i), len(calibration.batches),
                           max_tokens)
        hidden = original_hidden(site, model, x)
        n = hidden.shape[1]
        k = max(1, round(keep * n))
        modules = original_modules(site, model)
        down = linear_weight(modules[site.modules[-1]])[0].cpu()
        up_rows = torch.cat([colored_in_weights(*linear_weight(modules[m])) for m in site.modules_in()], 1)
        params_before = site.params(model)
        if method in PRUNING:
            partition = keep_top(importance(method, up_rows, down, hidden, generator), k)
        elif method == "fibration-weights":
            partition = FiberDendrogram(up_rows, linkage).cut_to_count(k)
        elif method == "fibration-activations":
            partition, fold = activation_fibers(hidden, importance("flap", up_rows, down, hidden), k, linkage)
        else:
            reps = span_representatives(hidden, down, k)
            partition, fold = activation_fibers(hidden, None, k, representatives=reps)
        site.apply(model, partition)
        if method in ("fibration-activations", "fibration-span"):
            _fold_columns(site, model, down, fold)
        if compensate:
            compensate_mlp(site, model, x, ridge)
        elif method == "flap":
            _flap_bias(site, model, partition.labels, hidden, down)
        site.commit()
        report.layers.append(LayerReport(site.name, n, partition.num_fibers, 0.0, params_before, site.params(model)))
    report.params_after = count_parameters(model)
    report.non_embedding_params_after = non_embedding_parameters(model)
    return report


@torch.no_grad()
def _fold_columns(site, model: nn.Module, down: torch.Tensor, fold: torch.Tensor) -> None:
    """Consumer columns of the fiber representatives: Σ_j a_j·col_j over each fiber's members."""
    layer = get_module(model, site.modules[-1])
    layer.weight.copy_((down.to(torch.float64) @ fold.T).to(layer.weight))


@torch.no_grad()
def _flap_bias(site, model: nn.Module, labels: torch.Tensor, hidden: torch.Tensor, down: torch.Tensor) -> None:
    """FLAP's own compensation: the mean output of the removed units moves into the consumer's bias."""
    removed = labels < 0
    if not bool(removed.any()):
        return
    shift = down[:, removed].to(torch.float64) @ hidden[:, removed].mean(0)
    layer = get_module(model, site.modules[-1])
    if layer.bias is None:
        layer.bias = nn.Parameter(shift.to(layer.weight))
    else:
        layer.bias.add_(shift.to(layer.bias))
