"""Fibers, flavored opfibers and covers of every hidden layer (emergent-fibration-symmetry.txt §2, Eqs. 3, 5, 9).

- Fibers run forward from the input (every input unit its own color): i ~fib j iff the colored in-weights
  Σ_{k∈c} W_ik (and the bias) agree for every color c of the previous layer (Eq. 3).
- Opfibers run backward from the output (every output unit its own opfiber): i ~op j iff the colored
  out-weights Σ_{k∈ĉ} W_ki agree for every opfiber ĉ of the next layer, and the flavors agree: q(i) = the fiber
  of i for a non-linear activation, 1 for a linear one (Eq. 5). Fibers synchronize activities, opfibers errors.
- Covers = fibers ∩ opfibers (Eq. 9); under full-batch GD they only coarsen (Theorem 2.1).

"Agree" is up to a precision ε in the seed's sense (§3.2): max_c |Σ_{k∈c}(W_ik − W_jk)| ≤ ε, with complete
linkage so every pair of a class is within ε; ε = 0 means equal up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from torch import nn

from .fibers import relabel, sum_columns
from .lossless import group_rows

LINEAR_ACTIVATIONS = (nn.Identity,)
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus, nn.Identity)


@dataclass
class DenseLayer:
    """One weighted layer h = σ(W x + b) of an MLP, as the symmetry computation sees it."""

    name: str
    weight: torch.Tensor  # (n_out, n_in)
    bias: torch.Tensor | None
    nonlinear: bool


@dataclass
class LayerSymmetry:
    """The three partitions of one hidden layer's units (labels 0..k−1) at one ε."""

    name: str
    epsilon: float
    fibers: torch.Tensor
    opfibers: torch.Tensor
    covers: torch.Tensor

    @property
    def units(self) -> int:
        return int(self.fibers.numel())

    def counts(self) -> dict[str, int]:
        n = lambda labels: int(labels.max()) + 1 if labels.numel() else 0  # noqa: E731
        return {"units": self.units, "fibers": n(self.fibers), "opfibers": n(self.opfibers), "covers": n(self.covers)}


def dense_layers(model: nn.Sequential) -> list[DenseLayer]:
    """The Linear layers of a Linear/activation stack with whether an activation follows each."""
    if not isinstance(model, nn.Sequential):
        raise TypeError("Symmetries are computed for an nn.Sequential of Linear layers and activations.")
    mods = list(model)
    out: list[DenseLayer] = []
    for i, m in enumerate(mods):
        if isinstance(m, nn.Linear):
            nxt = next((x for x in mods[i + 1:] if not isinstance(x, nn.Dropout)), None)
            nonlinear = isinstance(nxt, ELEMENTWISE) and not isinstance(nxt, LINEAR_ACTIVATIONS)
            out.append(DenseLayer(str(i), m.weight.detach(), None if m.bias is None else m.bias.detach(), nonlinear))
        elif not isinstance(m, (*ELEMENTWISE, nn.Dropout, nn.Flatten)):
            raise ValueError(f"Layer {i} ({type(m).__name__}) is not supported; use Linear layers and elementwise "
                             "activations.")
    if len(out) < 2:
        raise ValueError("The model needs at least one hidden layer (two Linear layers).")
    return out


def cluster(rows: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Classes of rows within ε in every coordinate (complete linkage, Chebyshev); ε = 0: equal up to rounding."""
    n = rows.shape[0]
    if epsilon < 0:
        raise ValueError(f"epsilon must be ≥ 0, got {epsilon}.")
    if n < 2:
        return torch.zeros(n, dtype=torch.long)
    if epsilon == 0:
        scale = float(rows.abs().max()) if rows.numel() else 0.0
        return relabel(group_rows(rows, 8 * torch.finfo(torch.float32).eps * max(scale, 1e-300)))
    tree = linkage(rows.numpy(), method="complete", metric="chebyshev")
    return relabel(fcluster(tree, t=epsilon, criterion="distance") - 1)


def meet(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The coarsest common refinement of two labelings."""
    return relabel(a * (int(b.max()) + 1 if b.numel() else 1) + b)


def layer_symmetries(layers: Sequence[DenseLayer], epsilon: float) -> list[LayerSymmetry]:
    """Fibers (forward), flavored opfibers (backward) and covers of every hidden layer at one ε."""
    hidden = layers[:-1]
    fibers: list[torch.Tensor] = []
    colors = None
    for layer in hidden:
        w = layer.weight.to(torch.float64)
        rows = w if colors is None else sum_columns(w, colors)
        if layer.bias is not None:
            rows = torch.cat([rows, layer.bias.to(torch.float64).unsqueeze(1)], 1)
        colors = cluster(rows, epsilon)
        fibers.append(colors)
    opfibers: list[torch.Tensor] = [torch.empty(0)] * len(hidden)
    op_next = torch.arange(layers[-1].weight.shape[0])
    for idx in range(len(hidden) - 1, -1, -1):
        consumer = layers[idx + 1].weight.to(torch.float64)
        out_rows = sum_columns(consumer.T, op_next)  # (n_ℓ, opfibers of ℓ+1): Σ_{k∈ĉ} W_ki
        labels = cluster(out_rows, epsilon)
        if hidden[idx].nonlinear:
            labels = meet(labels, fibers[idx])
        opfibers[idx] = labels
        op_next = labels
    return [LayerSymmetry(layer.name, float(epsilon), f, o, meet(f, o))
            for layer, f, o in zip(hidden, fibers, opfibers, strict=True)]


def symmetries(model: nn.Sequential | Sequence[DenseLayer], epsilons: Sequence[float] = (0.0,),
               ) -> dict[float, list[LayerSymmetry]]:
    """Per ε, the fibers, opfibers and covers of every hidden layer of an MLP."""
    layers = dense_layers(model) if isinstance(model, nn.Module) else list(model)
    return {float(eps): layer_symmetries(layers, eps) for eps in epsilons}


def is_coarsening(fine: torch.Tensor, coarse: torch.Tensor) -> bool:
    """Every class of ``fine`` lies inside one class of ``coarse`` (nothing split)."""
    pairs = np.unique(np.stack([fine.numpy(), coarse.numpy()]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1]


def splits(before: torch.Tensor, after: torch.Tensor) -> int:
    """How many classes of ``before`` are split across several classes of ``after``."""
    pairs = np.unique(np.stack([before.numpy(), after.numpy()]), axis=1)
    _, counts = np.unique(pairs[0], return_counts=True)
    return int((counts > 1).sum())
