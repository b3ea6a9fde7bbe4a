"""Symmetry breaking: covers collapsed with the function kept, freed units re-randomized with zero out-weights."""

from __future__ import annotations

import torch
from test_opfibers import planted_cover_mlp

from hf_fibration.core.breaking import break_symmetry
from hf_fibration.core.opfibers import symmetries


def test_break_keeps_function_and_breaks_the_covers() -> None:
    model = planted_cover_mlp(3)
    x = torch.randn(200, 5, dtype=torch.float64)
    before = model(x).detach()
    w1_unit1 = model[0].weight[1].clone()
    report = break_symmetry(model, 0.0, generator=torch.Generator().manual_seed(0))
    assert report.freed == {"0": 1, "2": 1}
    assert (model(x) - before).abs().max() < 1e-12
    assert not torch.equal(model[0].weight[1], w1_unit1)  # re-randomized in-weights
    # zero out-weights (into the kept units; the freed unit 1 of layer 2 gets a fresh random row)
    assert (model[2].weight[[0, 2, 3, 4, 5], 1] == 0).all() and (model[4].weight[:, 1] == 0).all()
    after = symmetries(model, [0.0])[0.0]
    assert all(layer.counts()["covers"] == layer.units for layer in after)


def test_break_at_epsilon_collapses_quasi_covers() -> None:
    model = planted_cover_mlp(4)
    report = break_symmetry(model, 3.0, partition="fibers")
    assert report.total_freed > 2
    assert break_symmetry(planted_cover_mlp(4), 0.0).total_freed == 2
