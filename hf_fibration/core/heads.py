"""Attention heads as prunable units: where a head's weights live, per-head scores, and size allocation.

Pure torch. A *unit* is one key/value head together with the query heads that share it (GQA; for multi-head
attention, one head): its rows in q, k and v and its columns in the output projection, whose inputs are the query
heads' channels, head by head. Dropping a unit removes exactly those rows and columns, so the GQA repeat factor
(query heads per key/value head) is unchanged and the attention still runs on the heads that remain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HeadLayout:
    """Query heads, key/value heads and the head width of one attention."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if min(self.num_heads, self.num_kv_heads, self.head_dim) < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} query heads cannot share {self.num_kv_heads} key/value heads.")

    @property
    def units(self) -> int:
        return self.num_kv_heads

    @property
    def group(self) -> int:
        """Query heads per unit (the GQA repeat factor)."""
        return self.num_heads // self.num_kv_heads

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def query_channels(self, units: torch.Tensor) -> torch.Tensor:
        """Rows of q (and columns of the output projection) that belong to ``units``, in order."""
        width = self.group * self.head_dim
        return (units.long()[:, None] * width + torch.arange(width)).flatten()

    def kv_channels(self, units: torch.Tensor) -> torch.Tensor:
        """Rows of k and of v that belong to ``units``, in order."""
        return (units.long()[:, None] * self.head_dim + torch.arange(self.head_dim)).flatten()

    def unit_of_query_channel(self) -> torch.Tensor:
        return torch.arange(self.q_width) // (self.group * self.head_dim)

    def unit_of_kv_channel(self) -> torch.Tensor:
        return torch.arange(self.kv_width) // self.head_dim


class ChannelStats:
    """Per-channel count, sum and sum of squares of a layer's inputs over calibration tokens (streamed, float64)."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.total = torch.zeros(channels, dtype=torch.float64)
        self.squares = torch.zeros(channels, dtype=torch.float64)

    @classmethod
    def of(cls, inputs: torch.Tensor) -> ChannelStats:
        stats = cls(inputs.shape[-1])
        stats.update(inputs)
        return stats

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64).cpu()
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.squares += (x * x).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance (the fluctuation FLAP measures)."""
        centered = self.squares - self.count * self.mean**2
        return centered.clamp_min(0) / max(self.count - 1, 1)

    @property
    def norm(self) -> torch.Tensor:
        return self.squares.sqrt()


def _per_unit(values: torch.Tensor, unit_of: torch.Tensor, units: int) -> torch.Tensor:
    return torch.zeros(units, dtype=torch.float64).index_add_(0, unit_of, values.to(torch.float64))


def flap_channel_metric(stats: ChannelStats, out_weight: torch.Tensor, heads: bool) -> torch.Tensor:
    """FLAP's fluctuation metric of each input channel of a consumer: Var(X_j)·‖W[:, j]‖², squared for attention
    heads as FLAP's code does before it standardizes them."""
    metric = stats.variance * (out_weight.detach().to(torch.float64) ** 2).sum(0)
    return metric**2 if heads else metric


def head_scores(criterion: str, layout: HeadLayout, rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                out_weight: torch.Tensor, stats: ChannelStats | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-unit scores for head pruning, the attention counterparts of ``core.compensate.importance``.

    ``rows``: the colored q, k and v rows (bias as a column); ``out_weight``: the output projection (d_out ×
    channels); ``stats``: its inputs on calibration tokens. random; l2 / l1: the norm of the unit's q, k and v rows;
    magnitude: that l2 norm × the norm of the unit's output columns; wanda-sp (An et al.'s structured Wanda):
    Σ over the unit's channels j of Σ_i |W_o[i, j]|·‖X_j‖; flap: the mean over the unit's channels of FLAP's
    fluctuation metric (``flap_channel_metric``), which standardized per layer is FLAP's head score."""
    n = layout.units
    if criterion == "random":
        return torch.rand(n, generator=generator, dtype=torch.float64)
    q_unit, kv_unit = layout.unit_of_query_channel(), layout.unit_of_kv_channel()
    out = out_weight.detach().to(torch.float64)
    if criterion in ("l1", "l2", "magnitude"):
        power = 1 if criterion == "l1" else 2
        q, k, v = (r.detach().to(torch.float64).abs() ** power for r in rows)
        total = _per_unit(q.sum(1), q_unit, n) + _per_unit(k.sum(1), kv_unit, n) + _per_unit(v.sum(1), kv_unit, n)
        if criterion == "l1":
            return total
        if criterion == "l2":
            return total.sqrt()
        return total.sqrt() * _per_unit((out**2).sum(0), q_unit, n).sqrt()
    if stats is None:
        raise ValueError(f"The {criterion!r} head score needs calibration inputs of the output projection.")
    if criterion == "wanda-sp":
        return _per_unit(out.abs().sum(0) * stats.norm, q_unit, n)
    if criterion == "flap":
        return _per_unit(flap_channel_metric(stats, out, heads=True), q_unit, n) / (layout.group * layout.head_dim)
    raise ValueError(f"Unknown head score {criterion!r}; choose random, l2, l1, magnitude, wanda-sp or flap.")


def standardized(metric: torch.Tensor) -> torch.Tensor:
    """(m − mean) / std over one layer's channels: FLAP's per-layer standardization before the global ranking."""
    m = metric.to(torch.float64)
    return (m - m.mean()) / m.std().clamp_min(1e-30) if m.numel() > 1 else torch.zeros_like(m)


def flap_head_scores(layout: HeadLayout, stats: ChannelStats, out_weight: torch.Tensor) -> torch.Tensor:
    """FLAP's global head score: the channel metric standardized over the layer, averaged over the unit."""
    z = standardized(flap_channel_metric(stats, out_weight, heads=True))
    return _per_unit(z, layout.unit_of_query_channel(), layout.units) / (layout.group * layout.head_dim)


def flap_allocation(scores: list[torch.Tensor], costs: list[int], budget: int) -> list[int]:
    """FLAP's global structure: every unit of every site (heads and MLP channels) in one ranking of standardized
    scores, kept best first while it fits in ``budget`` parameters (``costs``: parameters per unit of each site).

    FLAP cuts the ranking at one threshold, which lands within one head of the target; here a unit that would
    overshoot is passed over for the cheaper ones after it, so the total lands within one MLP unit. Every site
    keeps at least its best unit (an attention with no head is not a module transformers can run)."""
    counts = [1 if s.numel() else 0 for s in scores]
    left = budget - sum(c for c, k in zip(costs, counts, strict=True) if k)
    flat = [(float(v), site) for site, s in enumerate(scores)
            for rank, v in enumerate(torch.sort(s, descending=True).values.tolist()) if rank > 0]
    for _, site in sorted(flat, key=lambda t: -t[0]):
        if costs[site] <= left:
            counts[site] += 1
            left -= costs[site]
    return counts


def uniform_allocation(units: list[int], costs: list[int], coarse: list[bool], budget: int
                       ) -> tuple[list[int], float, float]:
    """One fraction for every site, fitted to ``budget`` parameters: the coarse sites (attention heads) keep
    round(f·n) units at the fraction f the budget allows, the fine sites (MLP units) the fraction g that then lands
    the total on the budget, within one unit (g = f up to the rounding of the head counts). Every site keeps at
    least one unit. Returns the counts, f and g."""
    full = sum(c * n for c, n in zip(costs, units, strict=True))
    f = min(max(budget / max(full, 1), 0.0), 1.0)
    counts = [min(n, max(1, round(f * n))) if is_coarse else n for n, is_coarse in zip(units, coarse, strict=True)]
    fine = [i for i, is_coarse in enumerate(coarse) if not is_coarse]
    rest = budget - sum(costs[i] * counts[i] for i in range(len(units)) if coarse[i])
    fine_full = sum(costs[i] * units[i] for i in fine)
    g = min(max(rest / max(fine_full, 1), 0.0), 1.0) if fine else f
    for i in fine:
        counts[i] = min(units[i], max(1, round(g * units[i])))
    while fine:  # one unit at a time on the site furthest from g, while that brings the total nearer
        gap = budget - sum(c * k for c, k in zip(costs, counts, strict=True))
        if gap > 0:
            candidates = [i for i in fine if counts[i] < units[i]]
            pick = min(candidates, key=lambda i: counts[i] / units[i], default=None)
            step = 1
        else:
            candidates = [i for i in fine if counts[i] > 1]
            pick = max(candidates, key=lambda i: counts[i] / units[i], default=None)
            step = -1
        if pick is None or abs(gap - step * costs[pick]) >= abs(gap):
            break
        counts[pick] += step
    return counts, f, g
