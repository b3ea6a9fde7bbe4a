"""Collapse a layer onto its fibers: average the rows of an output fiber, sum the columns of an input fiber.

For fibers with scales s_i (h_i = s_i·h_C, the scale-aware exact mode), the collapsed row is the mean of
row_i / s_i and the consumer's column is Σ_i s_i·col_i, which is the paper's Eq. (5) when every s_i = 1.
"""

from __future__ import annotations

import torch

from .fibers import FiberPartition, sum_columns


def mean_rows(weight: torch.Tensor, partition: FiberPartition) -> torch.Tensor:
    """Row of fiber C = mean over i ∈ C of weight[i] / s_i (axis 0; trailing axes kept)."""
    labels = partition.labels.to(weight.device)
    shape = [-1] + [1] * (weight.dim() - 1)
    scaled = weight / partition.scales.to(weight).reshape(shape)
    keep = labels >= 0
    scaled, labels = scaled[keep], labels[keep]
    out = weight.new_zeros((partition.num_fibers, *weight.shape[1:]))
    out.index_add_(0, labels, scaled)
    counts = torch.bincount(labels, minlength=partition.num_fibers).to(weight)
    return out / counts.reshape(shape)


def sum_rows(weight: torch.Tensor, partition: FiberPartition) -> torch.Tensor:
    """Row of fiber C = Σ_{i∈C} s_i·weight[i]: for factors that meet a fiber in a product (q·k)."""
    return sum_columns(weight.transpose(0, 1), partition.labels, partition.scales).transpose(0, 1)


def collapse_weight(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out_partition: FiberPartition | None = None,
    in_partition: FiberPartition | None = None,
    out_reduce: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eq. (5): the weight (and bias) of a layer whose outputs and inputs are collapsed onto fibers."""
    w = weight.detach()
    b = None if bias is None else bias.detach()
    if in_partition is not None:
        w = sum_columns(w, in_partition.labels, in_partition.scales)
    if out_partition is not None:
        reduce = {"mean": mean_rows, "sum": sum_rows}[out_reduce]
        w = reduce(w, out_partition)
        b = None if b is None else reduce(b.unsqueeze(1), out_partition).squeeze(1)
    return w.contiguous(), None if b is None else b.contiguous()


def expand_index(partition: FiberPartition) -> torch.Tensor:
    """Index that repeats fiber outputs back into the full-width slots (fiber id per unit)."""
    if (partition.labels < 0).any():
        raise ValueError("A dropped unit has no fiber to repeat; residual-stream writers cannot drop outputs.")
    return partition.labels.clone()
