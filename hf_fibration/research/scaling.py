"""Scaling laws L = L0·P^−α (P: non-embedding parameters) and what compression is worth against training small.

Pure math (numpy/scipy): fit a law with confidence intervals, invert it, read a compressed model against the
models trained from scratch (by their law and by interpolating between the trained sizes), and the seed's frontier
(the smallest model reaching each loss, over every retune point of every size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def fit_power_law(params: Sequence[float], losses: Sequence[float], level: float = 0.95) -> dict:
    """Least squares of log L = log L0 − α·log P, with t-based ``level`` intervals on α and L0."""
    from scipy import stats

    if len(params) != len(losses) or len(params) < 2:
        raise ValueError(f"A power-law fit needs at least 2 (P, L) points of equal count, got {len(params)} and "
                         f"{len(losses)}.")
    fit = stats.linregress(np.log(np.asarray(params, float)), np.log(np.asarray(losses, float)))
    n = len(params)
    t = stats.t.ppf(0.5 + level / 2, n - 2) if n > 2 else float("inf")
    return {
        "alpha": -fit.slope, "alpha_ci": [-fit.slope - t * fit.stderr, -fit.slope + t * fit.stderr],
        "L0": math.exp(fit.intercept),
        "L0_ci": [math.exp(fit.intercept - t * fit.intercept_stderr),
                  math.exp(fit.intercept + t * fit.intercept_stderr)],
        "r2": fit.rvalue ** 2, "points": n,
    }


def params_for_loss(law: dict, loss: float) -> float:
    """The P at which the law reaches ``loss``: (L0 / L)^(1/α)."""
    if law["alpha"] <= 0:
        raise ValueError(f"The law's α is {law['alpha']:.4g}: loss does not fall with size, so it cannot be "
                         "inverted.")
    return (law["L0"] / loss) ** (1 / law["alpha"])


def interpolate_params(trained: Sequence[tuple[float, float]], loss: float) -> float | None:
    """P at ``loss`` on the trained models' own curve: log-log interpolation between the two trained sizes whose
    losses bracket it (the curve made monotone: each size's loss is the best of it and every smaller size);
    None outside the trained range."""
    points = sorted(trained)
    best, curve = float("inf"), []
    for p, v in points:
        if v < best:
            best = v
            curve.append((p, v))
    for (p1, v1), (p2, v2) in zip(curve, curve[1:], strict=False):
        if v2 <= loss <= v1:
            if v1 == v2:
                return p1
            w = (math.log(v1) - math.log(loss)) / (math.log(v1) - math.log(v2))
            return math.exp(math.log(p1) + w * (math.log(p2) - math.log(p1)))
    if curve and loss == curve[0][1]:
        return curve[0][0]
    return None


def advantage_over_scratch(compressed_params: float, compressed_loss: float, law: dict | None,
                           trained: Sequence[tuple[float, float]] = ()) -> dict:
    """How many times more parameters a model trained from scratch needs to reach the compressed model's loss:
    by the scratch law (None without one) and, where the loss lies inside the trained sizes' range, by the trained
    sizes; ``advantage_at_least``: where the compressed model beats every trained size, the largest trained size
    over the compressed one (a scratch model would need more than the largest trained)."""
    by_law = None if law is None else params_for_loss(law, compressed_loss)
    by_sizes = interpolate_params(trained, compressed_loss) if trained else None
    beats_all = bool(trained) and compressed_loss < min(v for _, v in trained)
    return {"scratch_params_law": by_law, "advantage_law": None if by_law is None else by_law / compressed_params,
            "scratch_params_sizes": by_sizes,
            "advantage_sizes": None if by_sizes is None else by_sizes / compressed_params,
            "advantage_at_least": max(p for p, _ in trained) / compressed_params if beats_all else None}


def frontier(points: Sequence[tuple[float, float]], losses: Sequence[float]) -> list[tuple[float, float]]:
    """The seed's fit points: for each loss level, the smallest P among ``points`` (P, L) with L ≤ that level,
    paired with that model's own loss; levels no point reaches are left out, repeated models kept once."""
    out: list[tuple[float, float]] = []
    for level in sorted(losses):
        within = [(p, v) for p, v in points if v <= level]
        if within:
            best = min(within)
            if best not in out:
                out.append(best)
    return out
