"""Unit selection for pruning baselines: keep k units by a score, drop the rest (label −1).

They go through the same collapse path as the fibers, so a comparison differs only in which units survive.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .fibers import FiberPartition

Criterion = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def keep_top(scores: torch.Tensor, k: int) -> FiberPartition:
    """Keep the k highest-scoring units (in their original order), each its own fiber."""
    n = scores.numel()
    k = max(1, min(k, n))
    kept = torch.sort(torch.topk(scores, k).indices).values
    labels = torch.full((n,), -1, dtype=torch.long)
    labels[kept] = torch.arange(k)
    return FiberPartition(labels, torch.ones(n, dtype=torch.float64))


CRITERIA: dict[str, Criterion] = {
    "random": lambda rows, gen: torch.rand(rows.shape[0], generator=gen, dtype=torch.float64),
    "l2": lambda rows, gen: rows.norm(dim=1),
    "l1": lambda rows, gen: rows.abs().sum(dim=1),
}


def selection_partitioner(
    criterion: str, counts: Mapping[str, int], seed: int = 0
) -> Callable[[str, torch.Tensor], FiberPartition]:
    """A partitioner for ``compress_sequential`` keeping ``counts[layer]`` units chosen by ``criterion``."""
    if criterion not in CRITERIA:
        raise ValueError(f"Unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}.")
    gen = torch.Generator().manual_seed(seed)

    def partition(name: str, rows: torch.Tensor) -> FiberPartition:
        return keep_top(CRITERIA[criterion](rows, gen), counts[name])

    return partition
