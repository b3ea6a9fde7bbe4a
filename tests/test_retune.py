import copy
import json

import pytest
import transformers as T
from conftest import PAIRS

from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.data import build_eval_set, evaluate_loss, load_split
from hf_fibration.retune import compress_retune, retune


@pytest.fixture(scope="module")
def setup(marian_dir, tmp_path_factory):
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    folder = tmp_path_factory.mktemp("splits")
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:192]))
    (folder / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[192:]))
    model = T.MarianMTModel.from_pretrained(marian_dir).eval()
    tok = T.AutoTokenizer.from_pretrained(marian_dir)
    train = build_eval_set(model, tok, load_split(str(folder / "train.jsonl")), batch_size=32, max_length=32)
    evalset = build_eval_set(model, tok, load_split(str(folder / "eval.jsonl")), batch_size=32, max_length=32)
    return model, train, evalset


def test_retune_lowers_the_eval_loss(setup):
    model, train, evalset = setup
    compressed = copy.deepcopy(model)
    compress_pretrained(compressed, FibrationConfig(epsilon=0.6, parts=("mlp",)))
    before = evaluate_loss(compressed, evalset)
    result = retune(compressed, train, evalset, epochs=2, learning_rate=1e-3, progress=False)
    assert result.initial_loss == pytest.approx(before)
    assert result.best_loss < before
    assert evaluate_loss(compressed, evalset) == pytest.approx(result.best_loss, rel=1e-5)


def test_retune_resumes_from_its_checkpoint(setup, tmp_path):
    model, train, evalset = setup
    first = copy.deepcopy(model)
    r1 = retune(first, train, evalset, epochs=3, max_steps=4, eval_every=2, learning_rate=1e-3, patience=10,
                output_dir=tmp_path, progress=False)
    assert r1.steps == 4 and (tmp_path / "retune_state" / "model.safetensors").exists()
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
    second = copy.deepcopy(model)  # fresh weights: everything must come from the checkpoint
    r2 = retune(second, train, evalset, epochs=3, max_steps=8, eval_every=2, learning_rate=1e-3, patience=10,
                output_dir=tmp_path, resume=True, progress=False)
    assert r2.steps == 8
    assert [h["step"] for h in r2.history] == [2, 4, 6, 8]
    assert r2.history[:2] == r1.history
    assert r2.best_loss <= r1.best_loss


def test_compress_retune_loop_keeps_the_bound(setup):
    model, train, evalset = setup
    base = evaluate_loss(model, evalset)
    config = FibrationConfig(tolerance=0.05, search_steps=3, parts=("mlp",))
    result, rounds = compress_retune(copy.deepcopy(model), config, evalset, train, rho=0.05, quench=1.5,
                                     max_rounds=2, epochs=1, learning_rate=1e-3, progress=False)
    assert rounds and rounds[0]["round"] == 0
    kept = [r for r in rounds if r["within_bound"]]
    assert kept and rounds[0]["within_bound"]  # retuning a barely trained model only lowers its loss
    assert evaluate_loss(result, evalset) <= base * 1.05 + 1e-6
    assert evaluate_loss(result, evalset) == pytest.approx(kept[-1]["loss_retuned"], rel=1e-4)
    params = [r["params"] for r in rounds]
    assert all(a >= b for a, b in zip(params, params[1:], strict=False))
