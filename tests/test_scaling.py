import math

import numpy as np
import pytest

from hf_fibration.research.scaling import (
    advantage_over_scratch,
    fit_power_law,
    frontier,
    interpolate_params,
    params_for_loss,
)

L0, ALPHA = 6.0, 0.08


def law_loss(p: float) -> float:
    return L0 * p ** -ALPHA


def test_fit_recovers_a_planted_power_law_and_covers_it():
    rng = np.random.default_rng(0)
    params = [1e5, 2e5, 4e5, 8e5, 1.6e6, 3.2e6]
    losses = [law_loss(p) * math.exp(rng.normal(0, 0.002)) for p in params]
    fit = fit_power_law(params, losses)
    assert fit["alpha"] == pytest.approx(ALPHA, rel=0.05)
    assert fit["alpha_ci"][0] < ALPHA < fit["alpha_ci"][1]
    assert fit["L0_ci"][0] < L0 < fit["L0_ci"][1] and fit["r2"] > 0.99


def test_advantage_over_scratch_on_a_planted_law():
    params = [1e5, 2e5, 4e5, 8e5, 1.6e6]
    law = fit_power_law(params, [law_loss(p) for p in params])
    assert params_for_loss(law, law_loss(3e5)) == pytest.approx(3e5, rel=1e-6)
    # a compressed model of 5e4 parameters at the loss scratch reaches with 4e5: 8× better than scratch
    result = advantage_over_scratch(5e4, law_loss(4e5), law, trained=[(p, law_loss(p)) for p in params])
    assert result["advantage_law"] == pytest.approx(8.0, rel=1e-6)
    assert result["advantage_sizes"] == pytest.approx(8.0, rel=1e-6)
    # a compressed model worse than the smallest trained size: below 1× by the law, unknown by the sizes
    worse = advantage_over_scratch(5e4, law_loss(5e4), law, trained=[(p, law_loss(p)) for p in params])
    assert worse["advantage_law"] == pytest.approx(1.0, rel=1e-6) and worse["advantage_sizes"] is None
    assert worse["advantage_at_least"] is None and result["advantage_at_least"] is None
    # better than every trained size: more than the largest over the compressed, with or without a law
    better = advantage_over_scratch(1e5, law_loss(3.2e6), None, trained=[(p, law_loss(p)) for p in params])
    assert better["advantage_law"] is None and better["advantage_sizes"] is None
    assert better["advantage_at_least"] == pytest.approx(16.0)


def test_interpolation_between_trained_sizes_is_log_log_and_monotone():
    trained = [(1e5, 3.0), (4e5, 2.0), (1.6e6, 2.1)]  # the largest size overfits: never the answer
    assert interpolate_params(trained, 2.0) == pytest.approx(4e5)
    mid = interpolate_params(trained, math.exp((math.log(3.0) + math.log(2.0)) / 2))
    assert mid == pytest.approx(2e5, rel=1e-9)
    assert interpolate_params(trained, 1.9) is None and interpolate_params(trained, 3.5) is None


def test_frontier_keeps_the_smallest_model_at_each_loss():
    points = [(100, 2.0), (80, 2.2), (60, 2.5), (90, 2.1), (70, 2.6)]
    assert frontier(points, [2.0, 2.2, 2.5, 3.0]) == [(100, 2.0), (80, 2.2), (60, 2.5)]
    assert frontier(points, [1.5]) == []


def test_a_law_without_decay_cannot_be_inverted():
    with pytest.raises(ValueError, match="does not fall"):
        params_for_loss({"alpha": 0.0, "L0": 2.0}, 1.5)
