"""Fiber sources: one registry, every source in every policy, the existing ones unchanged, span as a real source."""

import copy
import json

import pytest
import torch
from test_compensate import causal_evalset
from test_target import _evalset
from tiny_models import tiny_model

from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.config import FIBER_SOURCES, register_fiber_source
from hf_fibration.core.compensate import SpanDendrogram, span_representatives
from hf_fibration.core.fibers import FiberDendrogram
from hf_fibration.core.report import CompressionReport
from hf_fibration.evaluation.evalset import evaluate_loss
from hf_fibration.methods.baselines import compress_mlps
from hf_fibration.models.sites import build_sites
from hf_fibration.models.surgery import get_module, linear_weight, non_embedding_parameters
from hf_fibration.policies.search import greedy_search
from hf_fibration.repair import calibration
from hf_fibration.repair.calibration import Calibration
from hf_fibration.training.retune import compress_retune

# Measured with the code before the registry (commit 0d73fa0's fiber paths) on these tiny models, then re-measured
# once when the refit's λ became relative to the site's original units (UnitScale) instead of the kept ones: the
# units kept per site by the target size, its ε's, and the search and held-out losses.
TARGET_BEFORE = {
    ("llama", "weights"): ([12, 5, 3, 1, 8], [0.683066, 1.250436, 1.320906, 1.418357, 0.814089],
                           4.1661095884111194, 4.184431460168627),
    ("llama", "activations"): ([5, 23, 48], [1.351368, 0.686093, 0.681484], 4.1710206303331585, 4.187797129154205),
    ("llama", "inout"): ([17, 12, 3, 1, 8, 10], [0.792014, 0.683066, 1.320906, 1.418357, 0.814089, 1.132394],
                         4.16575265261862, 4.184481693638696),
    ("llama", "afde"): ([3, 13, 12, 3, 1, 8, 16], [1.341488, 0.651942, 0.683066, 1.320906, 1.418357, 0.814089,
                                                   0.512022], 4.165910462538402, 4.185346719291475),
}
SEARCH_BEFORE = {  # the default τ search (compensation on) at τ = 0.05
    "weights": [12, 11, 8, 5, 10, 18, 9, 9, 6, 7, 10, 18, 9],
    "activations": [12, 11, 8, 5, 10, 14, 8, 9, 6, 7, 10, 14, 9],
    "inout": [12, 11, 8, 5, 10, 17, 9, 9, 6, 7, 10, 19, 9],
    "afde": [12, 11, 8, 5, 10, 10, 6, 9, 6, 7, 10, 9, 7],
}
BASELINES_BEFORE = {  # compress_mlps(..., 0.4) on 12 batches, loss after, without and with compensation
    ("llama", "fibration-span"): (4.175959914922714, 4.175737745382569),
    ("llama", "fibration-activations"): (4.176123476841233, 4.175958083886089),
    ("gpt2", "fibration-span"): (4.168848064361197, 4.167149608333905),
    ("gpt2", "fibration-activations"): (4.167417621070689, 4.167186854012085),
}


@pytest.mark.parametrize("source", ["weights", "activations", "inout", "afde"])
def test_existing_sources_allocate_a_target_size_as_before(source):
    model = tiny_model("llama")
    report = compress_pretrained(model, FibrationConfig(fibers_from=source, target_params=0.6),
                                 evalset=_evalset(model, batches=4), progress=False)
    units, epsilons, final, held = TARGET_BEFORE[("llama", source)]
    assert [r.units_after for r in report.layers] == units
    assert [r.epsilon for r in report.layers] == pytest.approx(epsilons, abs=1e-6)
    assert report.final_loss == pytest.approx(final, rel=1e-7)
    assert report.holdout_final_loss == pytest.approx(held, rel=1e-7)


@pytest.mark.parametrize("source", ["weights", "activations", "inout", "afde"])
def test_existing_sources_search_as_before(source):
    model = tiny_model("llama")
    report = compress_pretrained(model, FibrationConfig(fibers_from=source, tolerance=0.05),
                                 evalset=_evalset(model, batches=4), progress=False)
    assert [r.units_after for r in report.layers] == SEARCH_BEFORE[source]


@pytest.mark.parametrize("key", sorted(BASELINES_BEFORE))
def test_bench_span_and_activations_fold_as_before(key):
    family, method = key
    for compensate, before in zip((False, True), BASELINES_BEFORE[key], strict=True):
        model = tiny_model(family)
        evalset = causal_evalset(model, n_batches=12)
        compress_mlps(model, method, 0.4, evalset, compensate=compensate)
        assert evaluate_loss(model, evalset) == pytest.approx(before, rel=1e-7)


def _hidden(n: int = 40, tokens: int = 300, rank: int = 12):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g,
                                                                                   dtype=torch.float64)
    return h + 0.01 * torch.randn(tokens, n, generator=g, dtype=torch.float64), torch.randn(5, n, generator=g)


def test_span_dendrogram_is_nested_and_its_epsilon_is_the_relative_residual():
    hidden, down = _hidden()
    dendro = SpanDendrogram(hidden, down)
    n = hidden.shape[1]
    for k in (1, 5, 12, 30):
        assert torch.equal(dendro.order[:k], span_representatives(hidden, down, k))  # the bench's pivots
        assert dendro.cut_to_count(k).num_fibers == k
        assert dendro.cut(dendro.epsilon_for_count(k)).num_fibers <= k
    residual = [dendro.epsilon_for_count(k) for k in range(1, n + 1)]
    assert residual == sorted(residual, reverse=True) and residual[-1] == 0.0
    assert residual[11] < 0.05 < residual[10]  # rank 12 plus noise: 12 units span nearly all of it
    assert dendro.cut(0.05).num_fibers == 12
    assert dendro.cut(0.0).is_trivial
    # the relative residual is that of projecting the output-weighted activations onto the kept units' span
    phi = (hidden - hidden.mean(0)) * down.to(torch.float64).norm(dim=0)
    kept = phi[:, dendro.order[:12]]
    rest = phi - kept @ torch.linalg.lstsq(kept, phi).solution
    assert dendro.epsilon_for_count(12) == pytest.approx(float(rest.norm() / phi.norm()), rel=1e-6)


def test_span_from_sums_read_a_chunk_at_a_time_is_the_span_of_the_whole_activations(monkeypatch):
    model = tiny_model("llama")
    config = FibrationConfig(fibers_from="span", parts=("mlp",))
    site = [s for s in build_sites(model, config) if s.kind == "mlp"][0]
    tokens = torch.randn(100, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    cal = Calibration.from_tokens(tokens)
    monkeypatch.setattr(calibration, "REFIT_CHUNK_TOKENS", 7)  # 15 chunks, the last one short
    down = linear_weight(get_module(model, site.modules[-1]))[0]
    whole = SpanDendrogram(calibration.original_hidden(site, model, cal.inputs), down)
    sums = calibration.original_sums(site, model, cal)
    chunked = SpanDendrogram.from_sums(*sums, down)
    assert torch.equal(chunked.order, whole.order)
    assert torch.allclose(chunked.residual, whole.residual, atol=1e-6)  # √(round-off) where nothing is left
    parts = chunked.gram if isinstance(chunked.gram, tuple) else (chunked.gram,)
    assert len(parts) >= 2  # the statistics' cells, read where they are
    assert torch.allclose(sum(parts), whole.gram, rtol=1e-12)
    summed = SpanDendrogram.from_sums(sum(parts), *sums[1:], down)
    for count in (3, 17, 40):  # every cut folds the same from the cells as from their sum
        a, b = chunked.cut_to_count(count), summed.cut_to_count(count)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.labels, whole.cut_to_count(count).labels)
        torch.testing.assert_close(a.fold.to_dense(), b.fold.to_dense(), rtol=1e-12, atol=0)


def test_span_needs_data_in_one_line():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="fibers_from='span' forms fibers from calibration activations"):
        compress_pretrained(model, FibrationConfig(epsilon=0.3, fibers_from="span"), progress=False)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_span_in_the_target_size(family):
    model = tiny_model(family)
    before = non_embedding_parameters(model)
    config = FibrationConfig(target_params=0.6, fibers_from="span", parts=("mlp",), holdout_fraction=0)
    report = compress_pretrained(model, config, evalset=causal_evalset(model, n_batches=6), progress=False)
    assert abs(non_embedding_parameters(model) / before - 0.6) <= 0.006
    assert report.layers and all(0 < r.epsilon <= 1 for r in report.layers)


def test_span_in_the_search_with_and_without_compensation():
    for compensate in (True, False):
        model = tiny_model("llama")
        evalset = causal_evalset(model, n_batches=8)
        base = evaluate_loss(model, evalset)
        config = FibrationConfig(tolerance=0.002, fibers_from="span", parts=("mlp",), compensate=compensate,
                                 holdout_fraction=0)
        report = greedy_search(model, config, evalset, progress=False)
        assert report.layers and all(r.units_after < r.units_before for r in report.layers)
        assert report.final_loss <= base * 1.002 + 1e-12
        assert evaluate_loss(model, evalset) == pytest.approx(report.final_loss, rel=1e-6)


def test_span_at_a_fixed_epsilon_with_data():
    model = tiny_model("gpt2")
    report = compress_pretrained(model, FibrationConfig(epsilon=0.5, fibers_from="span", parts=("mlp",)),
                                 evalset=causal_evalset(model, n_batches=4), progress=False)
    assert report.layers and all(r.epsilon == 0.5 and r.units_after < r.units_before for r in report.layers)


def test_span_in_alg2():
    model = tiny_model("gpt2")
    evalset, train = causal_evalset(model, n_batches=4), causal_evalset(model, n_batches=2)
    config = FibrationConfig(tolerance=0.01, fibers_from="span", parts=("mlp",), holdout_fraction=0)
    result, rows = compress_retune(model, config, evalset, train, rho=1.0, max_rounds=1, progress=False, epochs=1)
    assert non_embedding_parameters(result) < non_embedding_parameters(tiny_model("gpt2"))
    assert rows[-1]["round"] == "final"


def test_a_registered_source_works_in_every_policy():
    built = []

    def first_half(site, model, config, calibration):
        built.append(calibration is not None)
        rows = torch.eye(site.units(model), dtype=torch.float64)
        half = site.units(model) // 2
        rows[half:, :half] = rows[:half, :half].clone()  # unit i + half duplicates unit i: one exact fiber each
        rows[half:, half:] = 0
        return FiberDendrogram(rows)

    register_fiber_source("toy", "Pairs unit i with unit i + n/2.", first_half, calibrated=True)
    try:
        assert "toy" in FIBER_SOURCES and FibrationConfig(fibers_from="toy").calibrates_mlps
        for kwargs in ({"epsilon": 0.0}, {"tolerance": 0.5}, {"target_params": 0.8}):
            model = tiny_model("gpt2")
            config = FibrationConfig(fibers_from="toy", parts=("mlp",), holdout_fraction=0, **kwargs)
            report = compress_pretrained(model, config, evalset=causal_evalset(model, n_batches=4), progress=False)
            assert report.layers and all(r.units_after < r.units_before for r in report.layers)
            if "epsilon" in kwargs:  # the toy's exact fibers: half the units
                assert all(r.units_after == r.units_before // 2 for r in report.layers)
        assert built and all(built)
        with pytest.raises(ValueError, match="already registered"):
            register_fiber_source("toy", "again", first_half)
    finally:
        FIBER_SOURCES.pop("toy", None)


def test_lossless_report_keeps_its_per_rule_counts_in_the_json():
    from tiny_models import plant_fibers

    model = tiny_model("bert")
    plant_fibers(model)
    report = compress_pretrained(model, FibrationConfig(lossless=True), progress=False)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["lossless"]["removed_total"]["equal"] == sum(r.units_before - r.units_after for r in report.layers)
    assert data["lossless"]["removed_total"]["equal"] > 0
    assert data["lossless"]["layers"][0]["removed"]["equal"] > 0
    again = CompressionReport.from_dict(copy.deepcopy(data))
    assert again.lossless is not None and again.lossless.removed == report.lossless.removed
