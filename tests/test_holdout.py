"""The τ promise on data the search never saw (held-out confirmation, honest refits)."""

import copy

import pytest
import torch
import transformers as T

from hf_fibration import FibrationConfig
from hf_fibration.core.compensate import RidgeStats, ridge_refit
from hf_fibration.evaluation.evalset import DataError, EvalSet, evaluate_loss, example_losses, loss_increase
from hf_fibration.models.sites import build_sites
from hf_fibration.models.surgery import non_embedding_parameters
from hf_fibration.policies.search import HoldoutError, greedy_search
from hf_fibration.repair.calibration import Calibration, compensate_mlp

VOCAB = 64
_chain = torch.softmax(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0)) * 4, dim=1)


def _sample(n: int, seed: int, length: int = 16) -> torch.Tensor:
    """Sequences of a peaked random bigram language: a small model learns it well and its MLPs matter."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(3, VOCAB, (n,), generator=g)
    for t in range(1, length):
        ids[:, t] = torch.multinomial(_chain[ids[:, t - 1]], 1, generator=g).squeeze(1)
    return ids


def _evalset(batches: int, seed: int) -> EvalSet:
    out = []
    for i in range(batches):
        ids = _sample(4, seed * 1000 + i)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return EvalSet("causal", out, [4 * 15] * batches)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=512, max_position_embeddings=64,
                           tie_word_embeddings=False)
    model = T.LlamaForCausalLM(config)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for step in range(300):
        ids = _sample(32, 10_000 + step)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_example_losses_add_up_to_the_eval_loss(trained):
    evalset = _evalset(3, 1)
    sums, counts = example_losses(trained, evalset)
    assert float(sums.sum() / counts.sum()) == pytest.approx(evaluate_loss(trained, evalset), rel=1e-6)
    increase, se = loss_increase((sums, counts), (sums + counts * 0.1, counts))
    assert increase == pytest.approx(0.1) and se == pytest.approx(0.0, abs=1e-9)


def test_split_keeps_every_example_once(trained):
    evalset = _evalset(4, 2)
    search, held = evalset.split(0.25, seed=3)
    assert search.num_examples + held.num_examples == 16 and held.num_examples == 4
    whole = evaluate_loss(trained, evalset) * evalset.total_weight
    parts = sum(evaluate_loss(trained, p) * p.total_weight for p in (search, held))
    assert parts == pytest.approx(whole, rel=1e-6)


def test_the_held_out_loss_stays_within_tau_on_unseen_text(trained):
    """Searched on 64 examples, confirmed on 64 others: text neither saw stays within τ (1.5·τ noise margin)."""
    model, unseen, tau = copy.deepcopy(trained), _evalset(16, 7), 0.02
    config = FibrationConfig(tolerance=tau, parts=("mlp",), search_steps=5)
    report = greedy_search(model, config, _evalset(32, 0), progress=False)
    assert report.non_embedding_ratio > 1.2
    assert report.holdout_final_loss <= report.holdout_base_loss * (1 + tau)
    assert evaluate_loss(model, unseen) <= evaluate_loss(trained, unseen) * (1 + 1.5 * tau)


def test_the_search_leaves_the_check_its_margin_and_searches_once(trained, monkeypatch):
    """48 search examples at τ 2%: a search that only keeps its own mean within τ breaks the held-out check (next
    test); one that leaves the check its margin candidate by candidate passes it the first time."""
    import hf_fibration.policies.search as search

    calls = []
    once = search._search_once
    monkeypatch.setattr(search, "_search_once", lambda *a, **k: calls.append(1) or once(*a, **k))
    model, tau = copy.deepcopy(trained), 0.02
    config = FibrationConfig(tolerance=tau, parts=("mlp",), search_steps=5)
    report = greedy_search(model, config, _evalset(24, 0), progress=False)
    assert len(calls) == 1 and len(report.attempts) == 1
    assert report.non_embedding_params_after < report.non_embedding_params_before
    bound = report.holdout_base_loss * (1 + tau)
    assert report.holdout_final_loss + config.holdout_z * report.holdout_se <= bound
    assert report.final_loss < report.base_loss * (1 + tau)  # the margin was spent on the search examples
    unseen = _evalset(16, 7)
    assert evaluate_loss(model, unseen) <= evaluate_loss(trained, unseen) * (1 + tau)


def test_the_block_search_evaluates_the_uncompressed_model_once_per_split(trained, monkeypatch):
    """The held-out base losses come from the caller's own evaluation (``holdout_losses``) and the search
    examples' from the curves' recording pass: before the first allocation is tried, each split has run once."""
    from hf_fibration.evaluation.evalset import join_examples
    from hf_fibration.policies import bound as bound_module

    model, search_set, holdout = copy.deepcopy(trained), _evalset(24, 0), _evalset(16, 5)
    runs = {"search": 0, "holdout": 0}
    at_first_check: dict = {}

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids")
        runs["search"] += ids is search_set.batches[0]["input_ids"]
        runs["holdout"] += ids is holdout.batches[0]["input_ids"]

    check = bound_module.SearchBound.check
    monkeypatch.setattr(bound_module.SearchBound, "check",
                        lambda *a, **k: at_first_check.setdefault("runs", dict(runs)) and check(*a, **k))
    model.register_forward_pre_hook(count, with_kwargs=True)
    examples: list = []
    evaluate_loss(model, holdout, examples=examples)  # what the CLI measures before compressing
    config = FibrationConfig(tolerance=0.02, parts=("mlp",), search="block")
    report = greedy_search(model, config, search_set, progress=False, holdout=holdout,
                           holdout_losses=join_examples(examples))
    assert at_first_check["runs"] == {"search": 1, "holdout": 1}
    assert runs["holdout"] == 1 + len(report.attempts)  # the caller's pass, then one check per attempt
    assert report.holdout_base_loss == pytest.approx(evaluate_loss(trained, holdout), rel=1e-9)
    assert report.non_embedding_params_after < report.non_embedding_params_before
    with pytest.raises(ValueError, match="pass holdout="):
        greedy_search(copy.deepcopy(trained), config, search_set, progress=False,
                      holdout_losses=join_examples(examples))


def test_a_failed_check_cuts_the_search_back_instead_of_searching_again(trained, monkeypatch):
    """48 search examples overfit at τ 2% when the search keeps only its own mean within τ (no margin): the next
    attempt keeps the sites the search took within the tighter bound (no second search) and confirms it on the
    held-out half once more."""
    import hf_fibration.policies.search as search

    monkeypatch.setattr(search, "HoldoutMargin", lambda *args: None)
    calls = []
    once = search._search_once
    monkeypatch.setattr(search, "_search_once", lambda *a, **k: calls.append(1) or once(*a, **k))
    model, unseen, tau = copy.deepcopy(trained), _evalset(16, 7), 0.02
    evalset = _evalset(24, 0)
    report = greedy_search(model, FibrationConfig(tolerance=tau, parts=("mlp",), search_steps=5), evalset,
                           progress=False)
    first, second = report.attempts
    assert len(calls) == 1 and "trimmed_to_sites" not in first
    assert second["trimmed_to_sites"] == len(report.layers) >= 1
    assert second["non_embedding_params"] > first["non_embedding_params"]
    assert report.holdout_final_loss + report.holdout_se <= report.holdout_base_loss * (1 + tau)
    search_half, _ = evalset.split(0.5, 0)
    assert evaluate_loss(model, search_half) == pytest.approx(report.final_loss, rel=1e-6)
    assert report.non_embedding_params_after == non_embedding_parameters(model) < non_embedding_parameters(trained)
    assert evaluate_loss(model, unseen) <= evaluate_loss(trained, unseen) * (1 + 1.5 * tau)


def test_a_small_eval_set_stops_with_a_message_instead_of_breaking_tau(trained, monkeypatch):
    """Sixteen examples let a search without the margin fit noise; the check must notice on its held-out half."""
    import hf_fibration.policies.search as search

    monkeypatch.setattr(search, "HoldoutMargin", lambda *args: None)
    model = copy.deepcopy(trained)
    before = non_embedding_parameters(model)
    with pytest.raises(HoldoutError, match="too few"):
        config = FibrationConfig(tolerance=0.02, parts=("mlp",), search_steps=5)
        greedy_search(model, config, _evalset(8, 0), progress=False)
    assert non_embedding_parameters(model) == before
    assert evaluate_loss(model, _evalset(2, 5)) == pytest.approx(evaluate_loss(trained, _evalset(2, 5)))
    original, restored = trained.state_dict(), model.state_dict()  # the searches' swaps undone, no model copy kept
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)
    with pytest.raises(DataError, match="at least 8"):
        greedy_search(model, FibrationConfig(parts=("mlp",)), _evalset(1, 0), progress=False)


def test_refit_is_skipped_without_enough_tokens_per_unit(trained):
    model = copy.deepcopy(trained)
    site = next(s for s in build_sites(model, FibrationConfig(parts=("mlp",))) if s.kind == "mlp")
    x = torch.randn(300, 32, dtype=torch.float64)
    dendro = site.dendrogram(model, FibrationConfig())
    site.apply(model, dendro.cut_to_count(200))
    result = compensate_mlp(site, model, Calibration.from_tokens(x))
    assert not result["refit"] and "per kept unit" in result["note"]
    result = compensate_mlp(site, model, Calibration.from_tokens(x), min_tokens_per_unit=1.0)
    assert "held-out" in result["note"]


def test_ridge_stats_refit_any_union_of_cells_exactly():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(300, 6, generator=g, dtype=torch.float64)
    y = h @ torch.randn(6, 3, generator=g, dtype=torch.float64) + torch.randn(300, 3, generator=g, dtype=torch.float64)
    cell = torch.arange(300) % 4
    stats = RidgeStats(h, y, cell, 4)
    for cells in [(0, 1), (1, 3), (0, 1, 2, 3)]:
        rows = torch.isin(cell, torch.tensor(cells))
        w, b = stats.solve(cells, 0.1)
        w1, b1 = ridge_refit(h[rows], y[rows], 0.1)
        torch.testing.assert_close(w, w1)
        torch.testing.assert_close(b, b1)
        (w2, b2), = stats.path(cells, (0.1,))
        torch.testing.assert_close(w2, w1)
