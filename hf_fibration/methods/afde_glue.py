"""AFDE blocks for the MLP sites of a transformers model (``FibrationConfig(fibers_from="afde")``, core/afde.py)."""

from __future__ import annotations

import torch
from torch import nn

from hf_fibration.core.afde import AFDEDendrogram
from hf_fibration.models.architectures import mlp_activation
from hf_fibration.models.sites import Site
from hf_fibration.models.surgery import linear_weight


def afde_dendrogram(site: Site, model: nn.Module, inputs: torch.Tensor | None = None,
                    exact_rtol: float = 1e-6) -> AFDEDendrogram:
    """The site's ε-FDE dendrogram: its in-rows and biases (fc1, or gate and up), the consumer's columns (fc2/down),
    the model's activation; ``inputs`` (calibration tokens × d_in) give the path metric, None the data-free one."""
    modules = site.originals(model)
    in_layers = [linear_weight(modules[m]) for m in site.modules_in()]
    out_weight = linear_weight(modules[site.modules[-1]])[0]
    return AFDEDendrogram(in_layers, out_weight, mlp_activation(model)[1], inputs, exact_rtol)
