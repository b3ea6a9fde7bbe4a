"""Fibration symmetry breaking (emergent-fibration-symmetry.txt §3.4): collapse the covers, re-randomize the rest.

Done in place, so the layer shapes (and an optimizer's parameter list) stay: for each cover of a hidden layer
with members c1..ck, c1 keeps the mean of the members' in-rows and receives the sum of their out-columns (the
collapse of Eq. 10, the function kept up to the ε of the covers), while c2..ck become the seed's "new nodes":
fresh random in-weights and zero out-weights. The function of the model is unchanged by the re-randomized
units (their outgoing weights are zero), so only the collapse itself can change it (not at all at ε = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .opfibers import dense_layers, layer_symmetries


@dataclass
class BreakReport:
    """Per hidden layer (Linear index): units and the units freed (re-randomized)."""

    epsilon: float
    units: dict[str, int] = field(default_factory=dict)
    freed: dict[str, int] = field(default_factory=dict)

    @property
    def total_freed(self) -> int:
        return sum(self.freed.values())


@torch.no_grad()
def break_symmetry(
    model: nn.Sequential, epsilon: float = 0.0, *, generator: torch.Generator | None = None,
    partition: str = "covers",
) -> BreakReport:
    """Collapse every hidden layer's covers (or fibers) in place and re-randomize the freed units.

    New in-weights follow PyTorch's default Linear init (U(±1/√fan_in)), biases zero; new out-weights are zero.
    """
    if partition not in ("covers", "fibers"):
        raise ValueError(f"partition must be 'covers' or 'fibers', got {partition!r}.")
    linears = [m for m in model if isinstance(m, nn.Linear)]
    symmetries = layer_symmetries(dense_layers(model), epsilon)
    report = BreakReport(float(epsilon))
    for idx, sym in enumerate(symmetries):
        prod, cons = linears[idx], linears[idx + 1]
        labels = getattr(sym, partition)
        freed = []
        for c in labels.unique():
            members = (labels == c).nonzero().flatten()
            if members.numel() < 2:
                continue
            rep, rest = members[0], members[1:]
            prod.weight[rep] = prod.weight[members].mean(0)
            if prod.bias is not None:
                prod.bias[rep] = prod.bias[members].mean()
            cons.weight[:, rep] = cons.weight[:, members].sum(1)
            freed.append(rest)
        report.units[sym.name] = sym.units
        report.freed[sym.name] = int(sum(r.numel() for r in freed))
        if freed:
            rest = torch.cat(freed)
            bound = 1.0 / math.sqrt(prod.weight.shape[1])
            fresh = torch.rand(rest.numel(), prod.weight.shape[1], generator=generator, dtype=torch.float64)
            prod.weight[rest] = ((2 * fresh - 1) * bound).to(prod.weight)
            if prod.bias is not None:
                prod.bias[rest] = 0.0
            cons.weight[:, rest] = 0.0
    return report
