"""Merging peers of fibration: Model Folding's k-means and variance repair, ZipIt!'s correlation matching.

Pure torch. Every function returns fiber labels (0..k-1 per unit) or per-fiber factors, so the merge itself is
the collapse every other method uses: the rows entering a fiber are averaged, the consumer's columns summed.

- Model Folding (Wang, Šikić, Thiele, Saukh, ICLR 2025): k-means on each unit's weight vector — everything that
  touches the unit, input rows and consumer columns concatenated — then a data-free repair of the merged unit's
  variance (Fold-AR): averaging n units whose pre-activations have mean pairwise correlation c shrinks the standard
  deviation by sqrt((1 + (n − 1)·c) / n), so the merged pre-activation is scaled back by the inverse. With no data,
  c is the cosine of the members' input rows (the correlation of w_i·x and w_j·x for isotropic x).
- ZipIt! (Stoica et al., 2023): the correlation of the units' activations on calibration data; greedily merge the
  most correlated pair, a merged group's similarity to the rest is the minimum over its members, damped by α.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def _one_thread() -> Iterator[None]:
    """k-means and greedy matching are long loops of small steps: thread start-up and synchronization cost more
    than the work (measured 30-250× slower on a loaded 2-core machine with the default threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def kmeans(points: torch.Tensor, k: int, *, restarts: int = 3, max_iter: int = 50, seed: int = 0) -> torch.Tensor:
    """Labels of Lloyd's k-means (k-means++ seeding, best of ``restarts`` by inertia) with no empty cluster.

    An emptied cluster is re-seeded at the point farthest from its centroid, so exactly k clusters come back
    (fewer only when there are fewer distinct points). Distances in float32: only the assignment matters."""
    x = points.detach().to(torch.float32)
    x = x - x.mean(0, keepdim=True)  # distances are unchanged; float32 loses less
    n = x.shape[0]
    k = max(1, min(k, n))
    if k == n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    sq = (x * x).sum(1)
    best, best_inertia = None, float("inf")
    with _one_thread():
        for _ in range(restarts):
            labels, inertia = _lloyd(x, sq, _plus_plus(x, sq, k, generator), max_iter)
            if inertia < best_inertia:
                best, best_inertia = labels, inertia
    return _relabel_dense(best)


def _sq_distances(x: torch.Tensor, sq: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    return (sq[:, None] - 2 * x @ centers.T + (centers * centers).sum(1)[None, :]).clamp_min_(0)


def _plus_plus(x: torch.Tensor, sq: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding; the pairwise distances are computed once (one matmul), so each of the k sequential
    steps is O(n), not O(n·d)."""
    n = x.shape[0]
    pairwise = _sq_distances(x, sq, x).to(torch.float64)
    draws = torch.rand(k, generator=generator, dtype=torch.float64)
    chosen = [int(draws[0] * n)]
    nearest = pairwise[chosen[0]].clone()
    for t in range(1, k):
        cumulative = nearest.cumsum(0)
        if cumulative[-1] <= 0:  # fewer distinct points than k: take any point not chosen yet
            taken = set(chosen)
            i = next(j for j in range(n) if j not in taken)
        else:
            i = min(int(torch.searchsorted(cumulative, draws[t] * cumulative[-1], right=True)), n - 1)
        chosen.append(i)
        torch.minimum(nearest, pairwise[i], out=nearest)
    return x[chosen].clone()


def _lloyd(x: torch.Tensor, sq: torch.Tensor, centers: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, float]:
    k = centers.shape[0]
    labels = None
    for _ in range(max_iter):
        dist = _sq_distances(x, sq, centers)
        fit, new = dist.min(1)
        empty = torch.nonzero(torch.bincount(new, minlength=k) == 0).flatten()
        if empty.numel():  # re-seed empty clusters at the worst-fit points
            new[torch.topk(fit, empty.numel()).indices] = empty
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k).clamp_min(1).to(x)
        centers = torch.zeros_like(centers).index_add_(0, labels, x) / counts[:, None]
    inertia = float(_sq_distances(x, sq, centers).gather(1, labels[:, None]).sum())
    return labels, inertia


def _relabel_dense(labels: torch.Tensor) -> torch.Tensor:
    """0..k-1 in order of first appearance."""
    _, first = torch.unique(labels, return_inverse=True)
    order = torch.full((int(first.max()) + 1,), -1, dtype=torch.long)
    out = torch.empty_like(first)
    next_id = 0
    for i, c in enumerate(first.tolist()):
        if order[c] < 0:
            order[c] = next_id
            next_id += 1
        out[i] = order[c]
    return out


def folding_features(in_rows: list[torch.Tensor], out_weight: torch.Tensor) -> torch.Tensor:
    """Model Folding's per-unit vector: every input row of the unit (gate and up for a gated MLP, biases as
    columns) and its consumer column, concatenated, unnormalized (units × features)."""
    return torch.cat([r.detach().to(torch.float64) for r in in_rows] + [out_weight.detach().to(torch.float64).T],
                     dim=1)


def inout_rows(in_rows: torch.Tensor, out_weight: torch.Tensor) -> torch.Tensor:
    """Rows for the covers view of a fiber (fibers ∩ opfibers, made approximate): each unit's colored in-row and
    consumer column, each normalized, side by side, so the cosine of two rows is the mean of the two cosines."""
    return torch.cat([_unit(in_rows), _unit(out_weight.T)], dim=1)


def _unit(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.detach().to(torch.float64)
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)


def fold_repair_scales(rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fold-AR: per fiber, sqrt(n / (1 + (n − 1)·c̄)) with c̄ the mean pairwise cosine of the members' rows.

    Equal to 1 / ‖mean of the members' unit rows‖ (the std of an average of n unit-variance variables with those
    correlations is that norm); 1 for a single member, 1 for identical rows (an exact fiber is left alone)."""
    r = rows.detach().to(torch.float64)
    unit = r / r.norm(dim=1, keepdim=True).clamp_min(1e-30)
    kept = labels >= 0
    k = int(labels[kept].max()) + 1 if bool(kept.any()) else 0
    mean = torch.zeros(k, r.shape[1], dtype=torch.float64).index_add_(0, labels[kept], unit[kept])
    counts = torch.bincount(labels[kept], minlength=k).to(torch.float64)
    norm = (mean / counts.clamp_min(1)[:, None]).norm(dim=1)
    return torch.where(counts > 1, 1.0 / norm.clamp_min(1e-6), torch.ones_like(norm))


def activation_correlation(hidden: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the units' activations over calibration tokens (units × units); a constant unit
    correlates 0 with everything."""
    h = hidden.detach().to(torch.float64)
    h = h - h.mean(0, keepdim=True)
    h = h / h.norm(dim=0, keepdim=True).clamp_min(1e-30)
    return h.T @ h


def zipit_labels(correlation: torch.Tensor, k: int, alpha: float = 0.3) -> torch.Tensor:
    """ZipIt!'s greedy matching within one model: merge the most similar pair of groups until k remain.

    A merged group's similarity to every other is the minimum of its members' (complete linkage), then multiplied
    by ``alpha`` (ZipIt!'s α, which makes a group that already merged less eager to merge again; as in its code,
    a negative similarity moves toward 0). Each row's maximum is cached, so a merge costs O(n) plus the rows whose
    maximum it touched."""
    sims = correlation.detach().to(torch.float32).clone()
    n = sims.shape[0]
    k = max(1, min(k, n))
    sims.fill_diagonal_(-torch.inf)
    row_max, row_arg = sims.max(1)
    group = torch.arange(n)
    with _one_thread():
        return _relabel_dense(_greedy_merge(sims, row_max, row_arg, group, n - k, alpha))


def _greedy_merge(sims: torch.Tensor, row_max: torch.Tensor, row_arg: torch.Tensor, group: torch.Tensor, merges: int,
                  alpha: float) -> torch.Tensor:
    for _ in range(merges):
        i = int(row_max.argmax())
        j = int(row_arg[i])
        i, j = min(i, j), max(i, j)
        group[group == j] = i
        merged = torch.minimum(sims[i], sims[j]) * alpha
        merged[i] = -torch.inf
        sims[i], sims[:, i] = merged, merged
        sims[j], sims[:, j] = -torch.inf, -torch.inf
        row_max[j] = -torch.inf
        stale = torch.nonzero((row_arg == i) | (row_arg == j)).flatten()
        stale = stale[stale != j]
        if stale.numel():
            row_max[stale], row_arg[stale] = sims[stale].max(1)
        better = merged > row_max
        better[j] = False
        row_max[better], row_arg[better] = merged[better], i
        row_max[i], row_arg[i] = sims[i].max(0)
    return group
