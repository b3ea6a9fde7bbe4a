"""Watch fibration symmetry emerge during training: fibers / opfibers / covers per layer at a few ε, every N steps.

``SymmetryLogger`` is a plain hook for any loop (accelerate included): call it with the model and the step.
``FibrationCallback`` wraps it for ``transformers.Trainer``. An nn.Sequential MLP is analysed as a whole
(fibers forward from the input, opfibers backward from the output). A transformers model is analysed per MLP
site, each as a one-hidden-layer net between residual streams whose units are all distinct colors — a local
view: the residual stream's own symmetries are not tracked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hf_fibration.core.opfibers import DenseLayer, LayerSymmetry, dense_layers, layer_symmetries, splits
from hf_fibration.models.surgery import get_module, linear_weight
from hf_fibration.policies.lossless import mlp_sites

KINDS = ("fibers", "opfibers", "covers")


def _site_layers(model: nn.Module) -> list[list[DenseLayer]]:
    nets = []
    for site in mlp_sites(model):
        cols = []
        for name in site.modules_in():
            w, b = linear_weight(get_module(model, name))
            cols += [w] if b is None else [w, b.unsqueeze(1)]
        w_out, _ = linear_weight(get_module(model, site.modules[-1]))
        nets.append([DenseLayer(site.name, torch.cat(cols, 1), None, True), DenseLayer("out", w_out, None, False)])
    return nets


def measure(model: nn.Module, epsilons: Sequence[float]) -> dict[float, list[LayerSymmetry]]:
    """Per ε, the symmetries of every hidden layer (nn.Sequential) or MLP site (transformers model)."""
    with torch.no_grad():
        nets = [dense_layers(model)] if isinstance(model, nn.Sequential) else _site_layers(model)
        return {float(eps): [s for net in nets for s in layer_symmetries(net, eps)] for eps in epsilons}


def flatten(result: dict[float, list[LayerSymmetry]], prefix: str = "symmetry") -> dict[str, float]:
    """Scalar metrics: counts per layer and kind, and the compressibility 1 − Σ fibers / Σ units per ε."""
    out: dict[str, float] = {}
    for eps, layers in result.items():
        totals = dict.fromkeys(("units", *KINDS), 0)
        for layer in layers:
            for kind, n in layer.counts().items():
                totals[kind] += n
                if kind != "units":
                    out[f"{prefix}/{layer.name}/{kind}@{eps:g}"] = float(n)
        for kind in KINDS:
            out[f"{prefix}/{kind}@{eps:g}"] = float(totals[kind])
        out[f"{prefix}/compressibility@{eps:g}"] = 1.0 - totals["fibers"] / max(totals["units"], 1)
    return out


class SymmetryLogger:
    """Call ``logger(model, step)`` each step; every ``every`` steps it measures, keeps the history, counts
    the covers that split since the last measurement (Theorem 2.1 says none do under full-batch GD), and hands
    the scalars to ``log(metrics, step)`` when given (e.g. ``accelerator.log``)."""

    def __init__(self, epsilons: Sequence[float] = (0.0, 0.01, 0.05), every: int = 100,
                 log: Callable[[dict[str, float], int], Any] | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be ≥ 1, got {every}.")
        self.epsilons = tuple(float(e) for e in epsilons)
        self.every = every
        self.log = log
        self.history: list[dict[str, float]] = []
        self._last: dict[float, list[LayerSymmetry]] | None = None

    def __call__(self, model: nn.Module, step: int) -> dict[str, float] | None:
        if step % self.every:
            return None
        return self.measure(model, step)

    def measure(self, model: nn.Module, step: int) -> dict[str, float]:
        result = measure(model, self.epsilons)
        metrics = flatten(result)
        if self._last is not None:
            for eps in self.epsilons:
                split = sum(splits(a.covers, b.covers) for a, b in zip(self._last[eps], result[eps], strict=True))
                metrics[f"symmetry/cover_splits@{eps:g}"] = float(split)
        self._last = result
        self.history.append({"step": step, **metrics})
        if self.log is not None:
            self.log(metrics, step)
        return metrics


def _trainer_callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - transformers is a dependency
        return object
    return TrainerCallback


class FibrationCallback(_trainer_callback_base()):
    """``transformers.TrainerCallback`` logging symmetries every ``every`` steps.

    The metrics go into ``state.log_history`` (saved in trainer_state.json) and, through ``on_log``, to the
    trainer's loggers (TensorBoard, W&B, ...). Integration callbacks run in the order they were added, so use
    ``FibrationCallback.attach(trainer)``, which puts this one first, for them to see the metrics.
    """

    def __init__(self, epsilons: Sequence[float] = (0.0, 0.01, 0.05), every: int = 100) -> None:
        self.logger = SymmetryLogger(epsilons, every)
        self._pending: dict[str, float] = {}

    def attach(self, trainer: Any) -> FibrationCallback:
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any) -> Any:
        if model is not None and state.global_step % self.logger.every == 0:
            self._pending = self.logger.measure(_unwrap(model), state.global_step)
            state.log_history.append({**self._pending, "step": state.global_step})
            control.should_log = True
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> Any:
        if self._pending and logs is not None:
            logs.update(self._pending)
            self._pending = {}
        return control


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)
