"""Unit selection for pruning baselines: keep k units by a score, drop the rest (label −1).

They go through the same collapse path as the fibers, so a comparison differs only in which units survive.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .compensate import importance
from .fibers import FiberPartition


def keep_top(scores: torch.Tensor, k: int) -> FiberPartition:
    """Keep the k highest-scoring units (in their original order), each its own fiber."""
    n = scores.numel()
    k = max(1, min(k, n))
    kept = torch.sort(torch.topk(scores, k).indices).values
    labels = torch.full((n,), -1, dtype=torch.long)
    labels[kept] = torch.arange(k)
    return FiberPartition(labels, torch.ones(n, dtype=torch.float64))


CRITERIA = ("random", "l2", "l1")


def selection_partitioner(
    criterion: str, counts: Mapping[str, int], seed: int = 0
) -> Callable[[str, torch.Tensor], FiberPartition]:
    """A partitioner for ``compress_sequential`` keeping ``counts[layer]`` units chosen by ``criterion``."""
    if criterion not in CRITERIA:
        raise ValueError(f"Unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}.")
    gen = torch.Generator().manual_seed(seed)

    def partition(name: str, rows: torch.Tensor) -> FiberPartition:
        return keep_top(importance(criterion, rows, None, None, gen), counts[name])

    return partition
