import copy

import pytest
import transformers as T

from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.evaluation.evalset import DataError, build_eval_set, evaluate_loss, load_split
from hf_fibration.policies.search import greedy_search, naive_search


@pytest.fixture(scope="module")
def marian(marian_dir):
    model = T.MarianMTModel.from_pretrained(marian_dir).eval()
    tok = T.AutoTokenizer.from_pretrained(marian_dir)
    evalset = build_eval_set(model, tok, None, batch_size=32, max_length=32)  # the packaged Multi30k pairs
    return model, tok, evalset


def test_search_keeps_the_loss_bound_and_beats_exact(marian):
    model, _, evalset = marian
    config = FibrationConfig(tolerance=0.02, search_steps=5, parts=("attention", "mlp"))
    base = evaluate_loss(model, evalset)
    exact = copy.deepcopy(model)
    exact_report = compress_pretrained(exact, FibrationConfig(epsilon=0.0, parts=("attention", "mlp")))
    searched = copy.deepcopy(model)
    report = greedy_search(searched, config, evalset, progress=False)
    search, holdout = evalset.split(config.holdout_fraction, config.seed)
    assert report.base_loss == pytest.approx(evaluate_loss(model, search))
    assert report.final_loss == pytest.approx(evaluate_loss(searched, search), rel=1e-5)
    assert report.holdout_final_loss == pytest.approx(evaluate_loss(searched, holdout), rel=1e-5)
    assert report.holdout_final_loss <= report.holdout_base_loss * (1 + config.tolerance)
    assert evaluate_loss(searched, evalset) <= base * (1 + config.tolerance)  # both parts within τ: the whole is
    assert report.params_after < exact_report.params_after
    assert all(0 <= layer.epsilon <= config.epsilon_max for layer in report.layers)


def test_fast_search_makes_the_naive_decisions(marian):
    model, _, evalset = marian
    config = FibrationConfig(tolerance=0.02, search_steps=4, parts=("mlp",), compensate=False, holdout_fraction=0)
    fast = copy.deepcopy(model)
    report = greedy_search(fast, config, evalset, progress=False)
    naive_model, naive_eps = naive_search(copy.deepcopy(model), config, evalset)
    fast_eps = {layer.name: layer.epsilon for layer in report.layers}
    naive = {n: e for n, e in zip(_site_names(model, config), naive_eps, strict=True) if e is not None}
    assert naive and naive == fast_eps
    assert evaluate_loss(fast, evalset) == pytest.approx(evaluate_loss(naive_model, evalset), rel=1e-6)


def _site_names(model, config):
    from hf_fibration.models.sites import build_sites

    return [s.name for s in build_sites(model, config)]


def test_search_needs_data():
    from tiny_models import tiny_model

    with pytest.raises(ValueError, match="needs eval data"):
        compress_pretrained(tiny_model("gpt2"), FibrationConfig())


def test_empty_split_and_missing_column(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError):
        load_split(str(empty))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"sentence_x": "hello"}\n')
    ds = load_split(str(rows))
    from tiny_models import tiny_model

    with pytest.raises(DataError, match="No text column"):
        build_eval_set(tiny_model("gpt2"), None, ds, task="causal")
