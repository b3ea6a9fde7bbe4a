"""Fibers of a layer's output units: colored in-weights, one dendrogram per layer, cuts at any ε."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage

LINKAGES = ("complete", "average", "single")
EPSILON_MAX = 2.0


def relabel(labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Map arbitrary fiber ids to 0..k-1 in order of first appearance (dropped units, -1, stay -1)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    out = torch.full_like(labels, -1)
    mapping: dict[int, int] = {}
    for i, lab in enumerate(labels.tolist()):
        if lab < 0:
            continue
        out[i] = mapping.setdefault(lab, len(mapping))
    return out


def colored_in_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    input_labels: torch.Tensor | None = None,
    input_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ŵ[i, r] = Σ_{k: c(k)=r} s_k W[i, k, ...], flattened per row, with the bias as one more column.

    ``weight`` is (n_out, n_in, *kernel) for Linear/Conv; trailing kernel axes stay in the row.
    ``input_labels`` colors the inputs (None: every input its own color); ``input_scales`` are the
    positive factors h_k = s_k h_{c(k)} of a scale-aware coloring (None: all ones).
    """
    w = weight.detach().to(torch.float64)
    if input_labels is not None:
        w = sum_columns(w, input_labels, input_scales)
    rows = w.reshape(w.shape[0], -1)
    if bias is not None:
        rows = torch.cat([rows, bias.detach().to(torch.float64).reshape(-1, 1)], dim=1)
    return rows


def sum_columns(weight: torch.Tensor, labels: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Sum the input columns (axis 1) of ``weight`` within each color; label -1 drops the column."""
    labels = torch.as_tensor(labels, dtype=torch.long, device=weight.device)
    if scales is not None:
        shape = [1, -1] + [1] * (weight.dim() - 2)
        weight = weight * scales.to(weight).reshape(shape)
    keep = labels >= 0
    weight, labels = weight[:, keep], labels[keep]
    n_colors = int(labels.max()) + 1 if labels.numel() else 0
    out = weight.new_zeros((weight.shape[0], n_colors, *weight.shape[2:]))
    out.index_add_(1, labels, weight)
    return out


def cosine_distance_condensed(rows: torch.Tensor) -> np.ndarray:
    """Condensed (scipy) vector of 1 − cos between rows; zero rows are at distance 1 from everything.

    Memory: the float32 unit rows and one n × n float32 matrix, besides the condensed float64 result (the rows are
    normalized a few at a time and the upper triangle is read row by row; the values are those of the one-shot
    computation, bit for bit)."""
    norms = rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
    unit = torch.empty_like(rows, dtype=torch.float32)  # rows' memory layout, so the product below is the same call
    step = max(1, 2**20 // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        unit[start:start + step] = rows[start:start + step] / norms[start:start + step]
    dist = (1.0 - unit @ unit.T).clamp_(0.0, EPSILON_MAX).numpy()
    del unit
    n = rows.shape[0]
    condensed = np.empty(n * (n - 1) // 2, dtype=np.float64)
    start = 0
    for i in range(n - 1):  # the order of np.triu_indices(n, k=1)
        condensed[start:start + n - 1 - i] = dist[i, i + 1:]
        start += n - 1 - i
    return condensed


@dataclass
class FiberPartition:
    """Fiber id per unit (0..k-1, or -1 for a dropped unit) and the positive scale of each unit.

    ``fold`` (k × units, sparse: one coefficient per unit), when set, gives the consumer's new columns as W·foldᵀ
    instead of the sums over each fiber: units folded into a representative by a coefficient each
    (``core.compensate.activation_fibers``)."""

    labels: torch.Tensor
    scales: torch.Tensor
    fold: torch.Tensor | None = None

    @property
    def num_units(self) -> int:
        return int(self.labels.numel())

    @property
    def num_fibers(self) -> int:
        kept = self.labels[self.labels >= 0]
        return int(kept.max()) + 1 if kept.numel() else 0

    @property
    def is_trivial(self) -> bool:
        return self.num_fibers == self.num_units

    @classmethod
    def identity(cls, n: int) -> FiberPartition:
        return cls(torch.arange(n), torch.ones(n, dtype=torch.float64))


class FiberDendrogram:
    """One agglomerative clustering of a layer's colored in-weight rows, cut at any ε without recomputing.

    ε = 0 is the exact mode: rows equal within ``exact_rtol`` (or, with ``scale_aware``, rows that are
    positive multiples of each other within it). ε > 0 is the paper's quasi-fibration: complete (default)
    or average linkage on the cosine distance 1 − ŵ_i·ŵ_j of normalized rows.
    """

    def __init__(
        self,
        rows: torch.Tensor,
        linkage_method: str = "complete",
        scale_aware: bool = False,
        exact_rtol: float = 1e-6,
    ) -> None:
        if linkage_method not in LINKAGES:
            raise ValueError(f"Unknown linkage {linkage_method!r}; choose one of {', '.join(LINKAGES)}.")
        self.rows = rows.detach().to("cpu", torch.float64)  # scipy clusters on the CPU; weights may be on a GPU
        self.scale_aware = scale_aware
        self.exact_rtol = exact_rtol
        self.norms = self.rows.norm(dim=1)
        n = self.rows.shape[0]
        self.linkage = None if n < 2 else linkage(cosine_distance_condensed(self.rows), method=linkage_method)
        self._exact: FiberPartition | None = None

    @property
    def num_units(self) -> int:
        return int(self.rows.shape[0])

    def cut(self, epsilon: float) -> FiberPartition:
        """The fibers at threshold ε ∈ [0, 2); more ε never gives more fibers."""
        if not 0.0 <= epsilon < EPSILON_MAX:
            raise ValueError(f"epsilon must lie in [0, 2), got {epsilon}.")
        exact = self.exact()
        if epsilon == 0.0 or self.linkage is None:
            return exact
        labels = fcluster(self.linkage, t=epsilon, criterion="distance") - 1
        # Exact fibers are merged first, so the partition at ε > 0 is never finer than at ε = 0.
        labels = _join(labels, exact.labels.numpy())
        return FiberPartition(relabel(labels), self._scales(labels))

    def cut_to_count(self, num_fibers: int) -> FiberPartition:
        """The fibers when the dendrogram is cut to (at most) ``num_fibers`` clusters."""
        num_fibers = max(1, min(num_fibers, self.num_units))
        if self.linkage is None or num_fibers == self.num_units:
            return FiberPartition.identity(self.num_units) if not self.scale_aware else self.cut(0.0)
        labels = fcluster(self.linkage, t=num_fibers, criterion="maxclust") - 1
        return FiberPartition(relabel(labels), self._scales(labels))

    def epsilon_for_count(self, num_fibers: int) -> float:
        """The smallest ε whose cut has at most ``num_fibers`` fibers (merge heights are sorted)."""
        if self.linkage is None or num_fibers >= self.num_units:
            return 0.0
        heights = self.linkage[:, 2]
        return float(min(heights[self.num_units - max(num_fibers, 1) - 1], EPSILON_MAX - 1e-9))

    def exact(self) -> FiberPartition:
        if self._exact is None:
            self._exact = self._exact_partition()
        return self._exact

    def _exact_partition(self) -> FiberPartition:
        n = self.num_units
        if self.linkage is None:
            return FiberPartition.identity(n)
        candidates = fcluster(self.linkage, t=1e-4, criterion="distance")
        compare = self._directions() if self.scale_aware else self.rows
        labels = np.full(n, -1, dtype=np.int64)
        next_label = 0
        for cand in np.unique(candidates):
            members = np.flatnonzero(candidates == cand)
            while members.size:
                ref = compare[members[0]]
                tol = self.exact_rtol * max(float(ref.abs().max()), 1e-30)
                same = (compare[members] - ref).abs().amax(dim=1) <= tol
                labels[members[same.numpy()]] = next_label
                next_label += 1
                members = members[~same.numpy()]
        return FiberPartition(relabel(labels), self._scales(labels))

    def _directions(self) -> torch.Tensor:
        return self.rows / self.norms.clamp_min(1e-30).unsqueeze(1)

    def _scales(self, labels: np.ndarray) -> torch.Tensor:
        """s_i with row_i ≈ s_i·u_fiber; 1 unless scale-aware (then the norm relative to the fiber's mean norm)."""
        if not self.scale_aware:
            return torch.ones(self.num_units, dtype=torch.float64)
        labels_t = torch.as_tensor(labels, dtype=torch.long)
        mean_norm = torch.zeros(int(labels_t.max()) + 1, dtype=torch.float64)
        mean_norm.index_add_(0, labels_t, self.norms)
        mean_norm /= torch.bincount(labels_t, minlength=mean_norm.numel()).to(torch.float64)
        return torch.where(mean_norm[labels_t] > 0, self.norms / mean_norm[labels_t].clamp_min(1e-30), 1.0)


def _join(coarse: np.ndarray, fine: np.ndarray) -> np.ndarray:
    """Smallest partition coarser than both: union of the clusters of ``coarse`` that share a ``fine`` fiber."""
    parent = list(range(int(coarse.max()) + 1))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_of_fine: dict[int, int] = {}
    for c, f in zip(coarse.tolist(), fine.tolist(), strict=True):
        other = first_of_fine.setdefault(f, c)
        ra, rb = find(c), find(other)
        if ra != rb:
            parent[ra] = rb
    return np.array([find(c) for c in coarse.tolist()])
