import copy
import gc
from pathlib import Path

import pytest
import torch
import transformers as T
from tiny_models import VOCAB, plant_fibers, tiny_model

from hf_fibration import FibrationConfig
from hf_fibration.evaluation.evalset import EvalSet, build_eval_set, evaluate_loss, examples_loss, loss_terms, task_of
from hf_fibration.models.sites import build_sites
from hf_fibration.models.surgery import get_module
from hf_fibration.pipeline.blocks import block_of, stacks_of
from hf_fibration.policies import block_search as block_search_module
from hf_fibration.policies.block_search import allocate, allocation_ladder, block_search, site_error_curves
from hf_fibration.policies.search import greedy_search
from hf_fibration.repair.calibration import PrefixRefits

PLAIN = dict(compensate=False, holdout_fraction=0.0, parts=("attention", "mlp"))


def _random_evalset(model, batches: int = 2) -> EvalSet:
    g = torch.Generator().manual_seed(5)
    task, out = task_of(model), []
    for _ in range(batches):
        ids = torch.randint(3, VOCAB, (4, 10), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        batch["labels"] = torch.randint(3, VOCAB, (4, 6), generator=g) if model.config.is_encoder_decoder else ids
        out.append(batch)
    return EvalSet(task, out, [loss_terms(task, b) for b in out])


@pytest.mark.parametrize("family", ["marian", "llama"])
def test_planted_fibers_are_found_at_epsilon_zero_as_the_greedy_search_finds_them(family):
    model = tiny_model(family)
    plant_fibers(model)
    evalset = _random_evalset(model)
    config = FibrationConfig(tolerance=1e-4, epsilon_max=0.0, **PLAIN)
    greedy, fast = copy.deepcopy(model), copy.deepcopy(model)
    greedy_report = greedy_search(greedy, config, evalset, progress=False)
    fast_report = block_search(fast, config, evalset, progress=False)
    units = lambda report: {layer.name: layer.units_after for layer in report.layers}  # noqa: E731
    assert units(fast_report) and units(fast_report) == units(greedy_report)
    assert evaluate_loss(fast, evalset) == pytest.approx(evaluate_loss(model, evalset), rel=1e-5)


def test_block_search_keeps_the_bound_on_a_trained_model(marian_dir):
    model = T.MarianMTModel.from_pretrained(marian_dir).eval()
    tok = T.AutoTokenizer.from_pretrained(marian_dir)
    full = build_eval_set(model, tok, None, batch_size=32, max_length=32)
    evalset = EvalSet(full.task, full.batches[:3], full.weights[:3])
    config = FibrationConfig(tolerance=0.02, calibration_tokens=1024, **{**PLAIN, "parts": ("mlp",)})
    base = evaluate_loss(model, evalset)
    report = block_search(model, config, evalset, progress=False)
    assert report.non_embedding_params_after < report.non_embedding_params_before
    assert evaluate_loss(model, evalset) == pytest.approx(report.final_loss, rel=1e-6)
    assert report.final_loss <= base * (1 + config.tolerance)


def test_allocation_trades_parameters_for_error():
    curves = {"a": [{"params_before": 100, "params": 60, "error": 0.01}, {"params_before": 100, "params": 20,
                                                                             "error": 1.0}],
              "b": [{"params_before": 100, "params": 50, "error": 0.5}]}
    assert allocate(curves, 1.0)["a"]["params"] == 20 and allocate(curves, 1.0)["b"]["params"] == 50
    assert allocate(curves, 50.0)["a"]["params"] == 60 and allocate(curves, 50.0)["b"]["params"] == 50
    assert allocate(curves, 1e4) == {"a": None, "b": None}


def test_the_ladder_holds_each_distinct_allocation_once_from_most_compressed_to_whole():
    curves = {"a": [{"params_before": 100, "params": p, "error": e} for p, e in ((80, 0.01), (40, 0.2), (10, 3.0))],
              "b": [{"params_before": 50, "params": p, "error": e} for p, e in ((30, 0.05), (5, 1.0))]}
    ladder = allocation_ladder(curves, -5.0, 10.0, samples=200)
    kept = [sum(c["params"] if c else c_before for c, c_before in ((ch["a"], 100), (ch["b"], 50))) for ch in ladder]
    assert kept == sorted(kept) and len(set(kept)) == len(kept) >= 4
    assert ladder[0] == {"a": curves["a"][2], "b": curves["b"][1]} and ladder[-1] == {"a": None, "b": None}


def test_compensated_cuts_measure_less_block_error_and_the_search_keeps_the_bound(marian_dir):
    model = T.MarianMTModel.from_pretrained(marian_dir).eval()
    tok = T.AutoTokenizer.from_pretrained(marian_dir)
    full = build_eval_set(model, tok, None, batch_size=32, max_length=32)
    evalset = EvalSet(full.task, full.batches[:3], full.weights[:3])
    mlp_sites = lambda config: [s for s in build_sites(model, config) if s.kind == "mlp"]  # noqa: E731
    errors = {}
    for compensate in (False, True):
        config = FibrationConfig(compensate=compensate, calibration_tokens=1024, parts=("mlp",))
        curves = site_error_curves(model, config, evalset, mlp_sites(config)[:2], progress=False, by_count=True)
        errors[compensate] = [c["error"] for curve in curves.values() for c in curve]
    assert len(errors[True]) == len(errors[False]) >= 10
    assert all(c <= p * (1 + 1e-6) for c, p in zip(errors[True], errors[False], strict=True))
    assert sum(errors[True]) < sum(errors[False])
    config = FibrationConfig(tolerance=0.02, calibration_tokens=1024, fibers_from="span", holdout_fraction=0.0,
                             parts=("mlp",))
    base = evaluate_loss(model, evalset)
    mlps = {site.name for site in mlp_sites(config)}
    report = block_search(model, config, evalset, progress=False)
    assert any(layer.name in mlps for layer in report.layers)
    assert all(layer.compensation for layer in report.layers if layer.name in mlps)
    assert evaluate_loss(model, evalset) == pytest.approx(report.final_loss, rel=1e-6)
    assert report.final_loss <= base * (1 + config.tolerance)


def test_the_tau_search_runs_the_block_search_with_its_held_out_check():
    model = tiny_model("llama")
    plant_fibers(model, noise=0.05)
    config = FibrationConfig(tolerance=0.02, search="block", compensate=False, holdout_fraction=0.5)
    report = greedy_search(model, config, _random_evalset(model, batches=4), progress=False)
    assert report.layers and report.holdout_examples == 8
    assert report.holdout_final_loss <= report.holdout_base_loss * (1 + config.tolerance)
    with pytest.raises(ValueError, match="Unknown search"):
        FibrationConfig(search="beam")


def test_a_failed_held_out_check_retries_the_block_search_on_the_curves_it_measured(monkeypatch):
    from hf_fibration.policies import block_search as block_module
    from hf_fibration.policies import search as search_module

    model = tiny_model("llama")
    plant_fibers(model, noise=0.05)
    measured, looks = [], []
    real_curves, real_increase = block_module.site_error_curves, search_module.loss_increase

    def counted(*args, **kwargs):
        measured.append(1)
        return real_curves(*args, **kwargs)

    def first_fails(base_terms, terms):
        increase, se = real_increase(base_terms, terms)
        looks.append(increase)
        return (increase + 10.0 if len(looks) == 1 else increase), se

    monkeypatch.setattr(block_module, "site_error_curves", counted)
    monkeypatch.setattr(search_module, "loss_increase", first_fails)
    config = FibrationConfig(tolerance=0.02, search="block", compensate=False, holdout_fraction=0.5)
    report = greedy_search(model, config, _random_evalset(model, batches=4), progress=False)
    assert len(report.attempts) == 2 and report.attempts[1]["tolerance"] < report.attempts[0]["tolerance"]
    assert len(measured) == 1


def test_the_refinement_between_ladder_steps_keeps_the_bound_and_never_keeps_more(monkeypatch):
    from hf_fibration.policies import block_search as block_module

    model = tiny_model("llama")
    plant_fibers(model, noise=0.05)
    evalset = _random_evalset(model, batches=2)
    config = FibrationConfig(tolerance=0.02, **PLAIN)
    refined = copy.deepcopy(model)
    refined_report = block_search(refined, config, evalset, progress=False)
    monkeypatch.setattr(block_module, "_refine", lambda *args: None)
    ladder_report = block_search(model, config, evalset, progress=False)
    assert refined_report.non_embedding_params_after <= ladder_report.non_embedding_params_after
    assert refined_report.final_loss <= refined_report.base_loss * (1 + config.tolerance)
    assert evaluate_loss(refined, evalset) == pytest.approx(refined_report.final_loss, rel=1e-6)


def test_local_pricing_equals_the_block_run_where_the_site_writes_the_residual_and_stays_close_elsewhere():
    """In a pre-norm block the MLP's change reaches the block output unchanged, so its site-output error scaled by
    one block run is every cut's block error; attention's changes pass softmax and the MLP after it, where the
    scaled error only approximates the block's (within 2× here)."""
    model = tiny_model("llama").eval()
    evalset = _random_evalset(model, batches=3)
    sites = [s for s in build_sites(model, FibrationConfig(**PLAIN)) if ".layers.0." in s.name]
    curves = {}
    for pricing in ("forward", "local"):
        config = FibrationConfig(cut_pricing=pricing, **PLAIN)
        curves[pricing] = site_error_curves(model, config, evalset, sites, progress=False, by_count=True)
    for site in sites:
        forward = [c["error"] for c in curves["forward"][site.name]]
        local = [c["error"] for c in curves["local"][site.name]]
        assert len(forward) == len(local) >= 4 and max(forward) > 0
        if site.kind == "mlp":
            assert local == pytest.approx(forward, rel=1e-4)
        else:
            ratios = [c / f for c, f in zip(local, forward, strict=True) if f > 0]
            assert 0.5 < min(ratios) <= max(ratios) < 2


def test_a_cut_applied_again_gets_back_from_disk_the_consumer_its_refit_solved(marian_dir, monkeypatch):
    model = T.MarianMTModel.from_pretrained(marian_dir).eval()
    tok = T.AutoTokenizer.from_pretrained(marian_dir)
    full = build_eval_set(model, tok, None, batch_size=32, max_length=32)
    evalset = EvalSet(full.task, full.batches[:3], full.weights[:3])
    config = FibrationConfig(calibration_tokens=1024, parts=("mlp",), fibers_from="span")
    site = [s for s in build_sites(model, config) if s.kind == "mlp"][0]
    solved, install = {}, PrefixRefits.install

    def recording(self, s, m, decision):
        result = install(self, s, m, decision)
        if result.get("refit"):
            solved[s._applied.num_fibers] = get_module(m, s.modules[-1]).weight.detach().clone()
        return result

    monkeypatch.setattr(PrefixRefits, "install", recording)  # span cuts are priced at once, solved when kept
    curves = site_error_curves(model, config, evalset, [site], progress=False, by_count=True)
    replayed = 0
    for cut in curves[site.name]:
        if cut["partition"].num_fibers in solved:
            site.apply(model, cut["partition"], cut["refit"])
            assert torch.equal(get_module(model, site.modules[-1]).weight, solved[cut["partition"].num_fibers])
            site.restore(model)
            site.commit()
            replayed += 1
    assert replayed >= 3
    folder = Path(cut["refit"].spill._folder.name)
    assert len(list(folder.glob("*.safetensors"))) == len(solved)
    del curves, cut
    gc.collect()
    assert not folder.exists()  # the spilled consumers go with the curves


@pytest.mark.parametrize("calibration_tokens,covers", [(8192, True), (30, False)])
def test_the_curves_pass_gives_the_base_loss_when_it_covers_the_eval_set(calibration_tokens, covers, monkeypatch):
    monkeypatch.setattr(block_search_module, "ERROR_TOKENS", 30)  # the carried tokens: 40 a batch, 3 batches
    model = tiny_model("llama")
    evalset = _random_evalset(model, batches=3)
    config = FibrationConfig(calibration_tokens=calibration_tokens, **PLAIN)
    examples: list = []
    site_error_curves(model, config, evalset, build_sites(model, config), progress=False, examples=examples)
    base = [examples_loss(examples, evalset)] if examples else []
    assert base == ([pytest.approx(evaluate_loss(model, evalset), rel=1e-12)] if covers else [])
    measured: list = []
    evaluate_loss(model, evalset, examples=measured)
    assert len(examples) == (len(measured) if covers else 0)  # the per-example losses the held-out margin reads
    for (sums, counts), (want_sums, want_counts) in zip(examples, measured[:len(examples)], strict=True):
        torch.testing.assert_close(sums, want_sums, rtol=1e-12, atol=0)
        assert torch.equal(counts, want_counts)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_a_rows_site_error_read_from_the_input_gram_equals_the_projected_tokens(family):
    from hf_fibration.policies.block_search import _SiteOutput

    model = tiny_model(family)
    config = FibrationConfig(**PLAIN)
    site = next(s for s in build_sites(model, config) if s.kind == "rows")
    inputs = torch.randn(50, get_module(model, site.modules[0]).weight.shape[1 if family != "gpt2" else 0]) + 0.5
    measure = _SiteOutput(model, site, inputs)
    reference = measure._output(model)
    dendro = site.dendrogram(model, config, None)
    site.apply(model, dendro.cut_to_count(max(1, site.units(model) // 3)), None)
    projected = float((measure._output(model) - reference).double().pow(2).sum())
    assert projected > 0
    measure._output = lambda model: pytest.fail("the error projected the tokens again")
    assert measure.error(model) == pytest.approx(projected, rel=1e-5)


def test_carried_batches_and_waiting_captures_go_to_disk_with_the_same_curves(monkeypatch):
    """With 3 carried batches and 1 measured, the block outputs of batches 2 and 3 go to a spill folder between
    blocks (the calibration reads them, the block errors do not), and each site's captured rows but the block's
    first wait there until the site is priced: the curves equal those of an in-memory carry."""
    monkeypatch.setattr(block_search_module, "ERROR_TOKENS", 30)  # the carried tokens: 40 a batch, 3 batches
    model = tiny_model("llama", layers=3)
    evalset = _random_evalset(model, batches=3)
    config = FibrationConfig(fibers_from="span", parts=("attention", "mlp"), holdout_fraction=0.0)
    sites = build_sites(model, config)
    spilled = site_error_curves(model, config, evalset, sites, progress=False, keep_refits=False)

    saves: list[str] = []
    folders: list = []

    class InMemory:
        def __init__(self) -> None:
            self.entries: dict[int, dict] = {}
            folders.append(self)

        def save(self, tensors: dict) -> int:
            saves.append(next(iter(tensors)))
            self.entries[len(saves)] = tensors
            return len(saves)

        def load(self, key: int) -> dict:
            return self.entries[key]

        def drop(self, key: int) -> None:
            del self.entries[key]

    monkeypatch.setattr(block_search_module, "SpillFolder", InMemory)
    kept = site_error_curves(model, config, evalset, sites, progress=False, keep_refits=False)
    assert saves.count("hidden") == 2 * 3  # two unmeasured batches, three blocks
    per_block = len({s.name for s in sites if block_of(s, stacks_of(model)[1]) == (0, 0)})
    assert saves.count("rows") == 3 * (per_block - 3)  # q, k and v read one capture, kept in memory
    assert not [e for folder in folders for e in folder.entries.values() if "rows" in e]  # each taken and dropped
    assert kept.keys() == spilled.keys()
    for name in kept:
        assert [c["error"] for c in kept[name]] == [c["error"] for c in spilled[name]]
        assert [c["params"] for c in kept[name]] == [c["params"] for c in spilled[name]]
