"""Calibration glue: capture what enters an MLP site, and the compensated collapse of its consumer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN

from .core.compensate import mlp_hidden, reconstruction_error, ridge_refit
from .core.modules import FiberLinear
from .patch import Site, get_module, linear_weight, set_module


class _Captured(Exception):
    """Raised by the capture hook: the forward pass stops once the site's input is recorded."""


def activation_of(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    config = model.config
    name = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None) or "gelu"
    return ACT2FN[name]


def capture_inputs(model: nn.Module, site: Site, run_batch: Callable[[int], object], num_batches: int,
                   max_tokens: int) -> torch.Tensor:
    """Tokens × d_in entering the site's first module, from up to ``num_batches`` batches (forward cut short)."""
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        captured.append(x.reshape(-1, x.shape[-1]).to(torch.float64).cpu())
        raise _Captured

    handle = get_module(model, site.modules[0]).register_forward_pre_hook(hook)
    try:
        for i in range(num_batches):
            try:
                with torch.no_grad():
                    run_batch(i)
            except _Captured:
                pass
            if sum(c.shape[0] for c in captured) >= max_tokens:
                break
    finally:
        handle.remove()
    x = torch.cat(captured)
    if x.shape[0] > max_tokens:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:max_tokens]]
    return x


def original_modules(site: Site, model: nn.Module) -> dict[str, nn.Module]:
    return site._originals or {m: get_module(model, m) for m in site.modules}


def original_hidden(site: Site, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """H of the uncompressed site (its original modules) on the calibration inputs."""
    return mlp_hidden(x, _f64_inputs(site, original_modules(site, model)), activation_of(model))


def compensate_mlp(site: Site, model: nn.Module, x: torch.Tensor, ridge: float = 1e-3) -> dict[str, float]:
    """After ``site.apply``: refit the consumer's columns and bias so its output on ``x`` matches the original's.

    Keeps the plain collapse when the refit would not lower the calibration reconstruction error (so exact
    fibers stay exact). Returns both errors."""
    out_name = site.modules[-1]
    w_orig, b_orig = (t if t is None else t.to(torch.float64).cpu() for t in linear_weight(site._originals[out_name]))
    target = original_hidden(site, model, x) @ w_orig.T
    if b_orig is not None:
        target = target + b_orig
    current = {m: get_module(model, m) for m in site.modules}
    hidden = mlp_hidden(x, _f64_inputs(site, current), activation_of(model))
    down = current[out_name]
    w_now, b_now = (t if t is None else t.cpu() for t in linear_weight(down))
    plain = reconstruction_error(hidden, w_now, b_now, target)
    weight, bias = ridge_refit(hidden, target, ridge)
    refit = reconstruction_error(hidden, weight, bias, target)
    if refit < plain:
        new = FiberLinear.from_weights(weight.to(down.weight.dtype).to(down.weight.device),
                                       bias.to(down.weight.dtype).to(down.weight.device),
                                       getattr(down, "fiber_index", None))
        set_module(model, out_name, new)
    return {"plain": plain, "refit": min(refit, plain)}


def _f64_inputs(site: Site, modules: dict[str, nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    pairs = []
    for m in site.modules_in():
        w, b = linear_weight(modules[m])
        pairs.append((w.to(torch.float64).cpu(), None if b is None else b.to(torch.float64).cpu()))
    return pairs
