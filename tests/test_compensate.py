import copy

import pytest
import torch
from tiny_models import inputs, plant_fibers, tiny_model

from hf_fibration import FibrationConfig
from hf_fibration.core.compensate import UnitStats, activation_fibers, ridge_refit, span_representatives
from hf_fibration.core.fibers import FiberDendrogram
from hf_fibration.evaluation.evalset import EvalSet, batch_loss_sum
from hf_fibration.methods.baselines import METHODS, compress_mlps
from hf_fibration.models.sites import build_sites
from hf_fibration.models.surgery import get_module, linear_weight
from hf_fibration.policies.search import greedy_search
from hf_fibration.repair.calibration import capture_calibration, capture_inputs, compensate_mlp


def causal_evalset(model, n_batches=3):
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(3, 64, (4, 12), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return EvalSet("causal", batches, [4 * 11] * n_batches)


def test_ridge_refit_matches_least_squares():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(500, 7, generator=g, dtype=torch.float64)
    y = h @ torch.randn(7, 3, generator=g, dtype=torch.float64) + 0.5
    w, b = ridge_refit(h, y, ridge=0.0)
    torch.testing.assert_close(h @ w.T + b, y)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_compensation_never_increases_the_reconstruction_error(family):
    model = tiny_model(family)
    evalset = causal_evalset(model, n_batches=12) if family != "bert" else None
    if evalset is None:
        ids = torch.randint(3, 64, (48, 12), generator=torch.Generator().manual_seed(0))
        evalset = EvalSet("masked", [{"input_ids": ids, "labels": ids.clone()}], [48 * 12])
    config = FibrationConfig(parts=("mlp",))
    for site in [s for s in build_sites(model, config) if s.kind == "mlp"]:
        x = capture_inputs(model, site, lambda i: batch_loss_sum(model, evalset, i), len(evalset.batches), 1024)
        dendro = site.dendrogram(model, config)
        site.apply(model, dendro.cut_to_count(dendro.num_units // 3))
        errors = compensate_mlp(site, model, x, min_tokens_per_unit=1.0)
        assert errors["refit"], errors["note"]  # a coarse collapse leaves room to refit, on tokens it never fit
        assert errors["held_out_refit"] < 0.9 * errors["plain"]
        site.commit()


def test_exact_fibers_stay_exact_with_compensation():
    model = tiny_model("llama")
    plant_fibers(model)
    batch = inputs(model)
    with torch.no_grad():
        reference = model(**batch).logits
    config = FibrationConfig(epsilon=0.0, parts=("mlp",), compensate=True)
    report = greedy_search(model, config, causal_evalset(model), progress=False)
    assert report.layers and all(r.units_after < r.units_before for r in report.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference, atol=1e-4, rtol=1e-4)


def test_search_with_compensation_keeps_the_bound_and_compresses_more():
    base_model = tiny_model("gpt2")
    plant_fibers(base_model, noise=0.05)
    evalset = causal_evalset(base_model, n_batches=8)
    results = {}
    for compensate in (False, True):
        model = copy.deepcopy(base_model)
        config = FibrationConfig(tolerance=0.01, parts=("mlp",), compensate=compensate, search_steps=5)
        report = greedy_search(model, config, evalset, progress=False)
        assert report.final_loss <= report.base_loss * 1.01 + 1e-9
        results[compensate] = report.params_after
    assert results[True] <= results[False]


def test_span_representatives_find_the_independent_units():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(400, 5, generator=g, dtype=torch.float64)
    mix = torch.randn(5, 15, generator=g, dtype=torch.float64)
    hidden = torch.cat([basis, basis @ mix], dim=1)  # 15 units in the span of the first 5
    reps = span_representatives(hidden, torch.ones(3, 20), 5)
    partition, fold = activation_fibers(hidden, None, 5, representatives=reps)
    assert partition.num_fibers == 5 and fold.shape == (5, 20)
    assert torch.linalg.matrix_rank(hidden[:, reps]) == 5


def test_every_method_reaches_the_same_width():
    base_model = tiny_model("llama")
    evalset = causal_evalset(base_model)
    sizes = set()
    for method in METHODS:
        for compensate in (False, True):
            model = copy.deepcopy(base_model)
            report = compress_mlps(model, method, 0.5, evalset, compensate=compensate)
            assert [r.units_after for r in report.layers] == [32, 32]
            sizes.add(sum(p.numel() for n, p in model.named_parameters() if "mlp" in n and "bias" not in n))
    assert len(sizes) == 1


def test_unknown_method():
    with pytest.raises(ValueError, match="Unknown method"):
        compress_mlps(tiny_model("llama"), "magic", 0.5, None)


def test_weight_dendrogram_is_exact_at_zero_for_planted_rows():
    model = tiny_model("gpt2")
    plant_fibers(model)
    site = next(s for s in build_sites(model, FibrationConfig(parts=("mlp",))) if s.kind == "mlp")
    assert isinstance(site.dendrogram(model, FibrationConfig()), FiberDendrogram)
    assert site.dendrogram(model, FibrationConfig()).cut(0.0).num_fibers == 128 - 32


def test_refit_read_in_chunks_equals_one_pass_and_apply_returns_it(monkeypatch):
    from hf_fibration.repair import calibration

    model = tiny_model("llama")
    evalset = causal_evalset(model, n_batches=12)
    config = FibrationConfig(parts=("mlp",))
    site = [s for s in build_sites(model, config) if s.kind == "mlp"][0]
    cal = calibration.capture_calibration(model, site, lambda i: batch_loss_sum(model, evalset, i),
                                          len(evalset.batches), 1024)
    originals = {m: model.get_submodule(m) for m in site.modules}
    part = site.dendrogram(model, config).cut_to_count(site.units(model) // 3)
    refit = lambda s, m: compensate_mlp(s, m, cal, min_tokens_per_unit=1.0, cross_fit=True)  # noqa: E731
    weights = []
    for chunk in (10**9, 7):  # one pass, then 7 tokens at a time
        monkeypatch.setattr(calibration, "REFIT_CHUNK_TOKENS", chunk)
        result = site.apply(model, part, refit)
        assert result is not None and result["refit"], result
        assert site.originals(model) == originals  # what apply swapped out, not the collapsed modules
        weights.append(model.get_submodule(site.modules[-1]).weight.detach().clone())
        assert len(result["folds"]) == 2
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-7)
    site.restore(model)
    assert all(model.get_submodule(m) is originals[m] for m in site.modules)


def test_refitter_caches_the_original_output_across_cuts_with_the_same_result():
    from hf_fibration.repair.calibration import Calibration, Refitter

    model = tiny_model("llama")
    config = FibrationConfig(parts=("mlp",))
    evalset = causal_evalset(model, n_batches=12)
    site = next(s for s in build_sites(model, config) if s.kind == "mlp")
    cal = Calibration.from_tokens(capture_inputs(model, site, lambda i: batch_loss_sum(model, evalset, i),
                                                 len(evalset.batches), 1024))
    dendro = site.dendrogram(model, config)
    cached = Refitter(cal, None, 1.0)
    for count in (dendro.num_units // 2, dendro.num_units // 3):
        site.apply(model, dendro.cut_to_count(count), cached)
        with_cache = {k: v.detach().clone() for k, v in model.state_dict().items()}
        site.restore(model)
        site.apply(model, dendro.cut_to_count(count), lambda s, m: compensate_mlp(s, m, cal, min_tokens_per_unit=1.0))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in with_cache.items())
        site.restore(model)
    assert cached.targets  # the second cut read the first one's original output
    cached.release()
    assert not cached.targets


def test_span_cut_from_the_gram_equals_the_fold_from_the_tokens():
    from hf_fibration.core.compensate import SpanDendrogram

    g = torch.Generator().manual_seed(1)
    hidden = torch.nn.functional.gelu(torch.randn(300, 12, generator=g, dtype=torch.float64)
                                      @ torch.randn(12, 40, generator=g, dtype=torch.float64))
    down = torch.randn(8, 40, generator=g, dtype=torch.float64)
    dendro = SpanDendrogram(hidden, down)
    for k in (1, 7, 12, 30):
        reps = dendro.order[:k]
        unit = hidden / hidden.norm(dim=0)
        nearest = (unit.T @ unit[:, reps]).argmax(dim=1)
        nearest[reps] = torch.arange(k)
        coef = (hidden * hidden[:, reps[nearest]]).sum(0) / (hidden[:, reps] ** 2).sum(0)[nearest]
        part = dendro.cut_to_count(k)
        assert part.num_fibers == k
        torch.testing.assert_close(part.fold.to_dense()[torch.argsort(torch.argsort(reps))[nearest], torch.arange(40)],
                                   torch.where(torch.isin(torch.arange(40), reps), 1.0, coef).double())


def _span_mlp_calibration(family: str = "llama"):
    """A tiny model, a span config, its first MLP site and 1024 calibration tokens entering it (12 batches)."""
    model = tiny_model(family)
    config = FibrationConfig(parts=("mlp",), fibers_from="span")
    evalset = causal_evalset(model, n_batches=12)
    site = next(s for s in build_sites(model, config) if s.kind == "mlp")
    cal = capture_calibration(model, site, lambda i: batch_loss_sum(model, evalset, i), len(evalset.batches), 1024)
    return model, config, site, cal


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_refit_from_unit_sums_equals_the_refit_from_tokens(family):
    from hf_fibration.repair.calibration import Calibration, Refitter

    model, config, site, cal = _span_mlp_calibration(family)
    assert isinstance(cal, Calibration)
    dendro = site.dendrogram(model, config, cal)
    tokens_cal = Calibration(cal.stored, cal.sequence, cal.batch)  # no sums cached: this one reads the tokens
    from_sums, from_tokens = Refitter(cal, None, 1.0, cross_fit=True, many_cuts=True), Refitter(tokens_cal, None, 1.0,
                                                                                                cross_fit=True)
    decided = set()
    for count in (dendro.num_units - 1, dendro.num_units // 2, dendro.num_units // 4, 2):
        results = []
        for refit in (from_sums, from_tokens):
            results.append(site.apply(model, dendro.cut_to_count(count), refit))
            results[-1]["consumer"] = linear_weight(get_module(model, site.modules[-1]))
            site.restore(model)
        sums, tokens = results
        assert sums["refit"] == tokens["refit"]
        decided.add(sums["refit"])
        torch.testing.assert_close(sums["plain"], tokens["plain"], rtol=1e-6, atol=1e-12)
        for a, b in zip(sums["consumer"], tokens["consumer"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        if sums["refit"]:
            assert sums["ridge"] == tokens["ridge"]
            for fa, fb in zip(sums["folds"], tokens["folds"], strict=True):
                torch.testing.assert_close(fa.weight, fb.weight, rtol=1e-4, atol=1e-5)
    assert cal.has_original_stats() and not tokens_cal.has_original_stats()  # each path was the one under test
    assert True in decided  # some cut was refit


def test_calibration_keeps_the_captured_dtype_and_gives_float64():
    model = tiny_model("llama")
    config = FibrationConfig(parts=("mlp",))
    evalset = causal_evalset(model, n_batches=4)
    site = next(s for s in build_sites(model, config) if s.kind == "mlp")
    cal = capture_calibration(model, site, lambda i: batch_loss_sum(model, evalset, i), len(evalset.batches), 100)
    assert cal.stored.dtype == torch.float32 and len(cal) == 100  # half the memory of float64, the same values
    assert cal.inputs.dtype == torch.float64 and torch.equal(cal.inputs, cal.stored.double())
    assert torch.equal(cal.rows(slice(10, 20)), cal.inputs[10:20])


def test_span_pivots_are_the_greedy_pivots_with_their_projection_residuals():
    """LAPACK's pivoted Cholesky picks, at every step, the unit least explained by those before it; the residual
    after t pivots is ‖Φ − P_t Φ‖_F / ‖Φ‖_F, here recomputed by least squares on Φ itself."""
    from hf_fibration.core.compensate import SpanDendrogram

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(300, 40, generator=g, dtype=torch.float64)
    hidden[:, 30:] = hidden[:, :10] @ torch.randn(10, 10, generator=g, dtype=torch.float64)  # rank 30
    down = torch.randn(8, 40, generator=g, dtype=torch.float64)
    dendro = SpanDendrogram(hidden, down)
    phi = (hidden - hidden.mean(0)) * down.norm(dim=0)
    chosen: list[int] = []
    for t in range(30):
        basis = phi[:, chosen]
        rest = phi - basis @ torch.linalg.lstsq(basis, phi).solution if chosen else phi
        assert abs(float(rest.norm() / phi.norm()) - float(dendro.residual[t])) < 1e-9
        left = rest.pow(2).sum(0)
        left[chosen] = -1
        chosen.append(int(left.argmax()))
        assert int(dendro.order[t]) == chosen[-1]
    assert float(dendro.residual[30]) < 1e-6 and sorted(dendro.order[30:].tolist()) == dendro.order[30:].tolist()


@pytest.mark.parametrize("row_block", [7, 128])  # several row blocks of L⁻¹AL⁻ᵀ, and one
def test_prefix_held_errors_equal_each_prefix_refit_scored_alone(monkeypatch, row_block):
    from hf_fibration.core import compensate
    from hf_fibration.core.compensate import UnitStats, prefix_held_errors

    monkeypatch.setattr(compensate, "PREFIX_ROW_BLOCK", row_block)

    g = torch.Generator().manual_seed(0)
    n, d, tokens = 30, 5, 700
    hidden = (torch.randn(tokens, 8, generator=g) @ torch.randn(8, n, generator=g)
              + 0.1 * torch.randn(tokens, n, generator=g) + 0.5).double()
    weight, bias = torch.randn(d, n, generator=g).double(), torch.randn(d, generator=g).double()
    cell = torch.randint(0, 4, (tokens,), generator=g)
    stats = UnitStats(4, weight, bias)
    stats.add(hidden[:300], cell[:300])  # accumulated in two chunks, as the refits read the tokens
    stats.add(hidden[300:], cell[300:])
    order, ridges = torch.randperm(n, generator=g), (1e-4, 1e-2, 1.0)
    errors = prefix_held_errors(stats, order, (0, 1), (2, 3), ridges)
    held, target = cell >= 2, hidden @ weight.T + bias
    for k in (1, 7, 19, n):
        for i, (w, b) in enumerate(stats.ridge_stats(order[:k]).path((0, 1), ridges)):
            direct = float((hidden[held][:, order[:k]] @ w.T + b - target[held]).pow(2).sum())
            assert float(errors[i, k - 1]) == pytest.approx(direct, rel=1e-8)
    torch.testing.assert_close(prefix_held_errors(stats, order, (0, 1), (2, 3), ridges, upto=19), errors[:, :19],
                               rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="ridge > 0"):
        prefix_held_errors(stats, order, (0, 1), (2, 3), (0.0,))


def test_prefix_refits_decide_and_install_every_span_cut_as_the_refitter_does_from_the_statistics_alone():
    from hf_fibration.repair.calibration import Refitter

    model, config, site, cal = _span_mlp_calibration()
    dendro = site.dendrogram(model, config, cal)
    refitter = Refitter(cal, None, 1.0, many_cuts=True)
    tokens = len(cal)
    prefix = refitter.prefixes(site, model, dendro.order, drop_rows=True)  # as the block search prices them
    assert len(cal) == tokens
    with pytest.raises(RuntimeError, match="dropped"):
        cal.rows(slice(0, 4))
    refit_seen = set()
    for count in (dendro.num_units - 1, dendro.num_units // 2, dendro.num_units // 4, 2):
        site.apply(model, dendro.cut_to_count(count), None)
        decision = prefix.install(site, model, prefix.decide(site, model))
        installed = linear_weight(get_module(model, site.modules[-1]))
        site.restore(model)
        result = site.apply(model, dendro.cut_to_count(count), refitter)
        solved = linear_weight(get_module(model, site.modules[-1]))
        site.restore(model)
        assert decision["refit"] == result["refit"]
        assert decision["plain"] == pytest.approx(result["plain"], rel=1e-9)
        assert decision["error"] == pytest.approx(result["held_out_refit"] if result["refit"] else result["plain"],
                                                  rel=1e-9)
        if result["refit"]:
            assert decision["ridge"] == result["ridge"]
        for a, b in zip(installed, solved, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        refit_seen.add(result["refit"])
    assert True in refit_seen


def test_calibration_keeps_one_set_of_sums_and_splits_by_parity_only_when_asked():
    model, config, site, cal = _span_mlp_calibration()
    unsplit = cal.original_stats(site, model)
    assert set(unsplit.gram) == {0, 2} and cal.original_stats(site, model) is unsplit  # fit and held out, once
    split = cal.original_stats(site, model, parity=True)  # a cross-fitting refit needs the batch parity
    assert split is not unsplit and set(split.gram) == {0, 1, 2, 3}
    assert cal.original_stats(site, model) is split  # the split sums serve every refit after
    gram = unsplit.total()[0]  # float32 products, summed in other groupings: float32's precision
    torch.testing.assert_close(split.total()[0], gram, rtol=1e-5, atol=1e-6 * float(gram.diagonal().mean()))


def test_unit_stats_float32_chunks_keep_the_centered_gram_of_units_with_large_means():
    torch.manual_seed(0)
    hidden = 500.0 + torch.randn(4096, 24, dtype=torch.float64) @ torch.randn(24, 24, dtype=torch.float64)
    cell = torch.arange(4096) % 2
    exact, fast = (UnitStats(2, torch.eye(24, dtype=torch.float64), None) for _ in range(2))
    for rows in torch.arange(4096).split(1024):
        exact.add(hidden[rows], cell[rows])
        fast.add(hidden[rows].to(torch.float32), cell[rows])
    reference = exact.centered_gram((0, 1))
    # a raw float32 Gram of these units loses the centered one to cancellation (mean² ≈ 10⁴ × the variance)
    raw = hidden.to(torch.float32).T @ hidden.to(torch.float32)
    n, mean = hidden.shape[0], hidden.mean(0)
    naive = raw.to(torch.float64) - n * torch.outer(mean, mean)
    scale = float(reference.diagonal().mean())
    assert float((naive - reference).abs().max()) > 1e-4 * scale
    torch.testing.assert_close(fast.centered_gram((0, 1)), reference, rtol=0, atol=1e-5 * scale)
