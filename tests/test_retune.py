import copy
import json

import pytest
import torch
import transformers as T
from conftest import PAIRS

from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.evaluation.evalset import EvalSet, build_eval_set, evaluate_loss, load_split
from hf_fibration.policies.search import greedy_search
from hf_fibration.training.distill import kl_divergence
from hf_fibration.training.retune import compress_retune, retune


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


@pytest.fixture(scope="module")
def trained(setup):
    """The tiny Marian after a short training, so that compression costs loss and retuning can win it back."""
    model, train, evalset = setup
    model = copy.deepcopy(model)
    retune(model, train, evalset, epochs=8, max_steps=40, learning_rate=5e-3, patience=100, progress=False)
    return model


ALG2 = FibrationConfig(tolerance=0.02, search_steps=3, epsilon_max=0.8, parts=("mlp",))


def test_alg2_searches_the_retuned_model_every_round(setup, trained, monkeypatch):
    _, train, evalset = setup
    import hf_fibration.training.retune as module

    searched_states, retuned_states = [], []

    def spy(model, config, evalset, progress=True):
        searched_states.append({k: v.clone() for k, v in model.state_dict().items()})
        return greedy_search(model, config, evalset, progress=progress)

    monkeypatch.setattr(module, "greedy_search", spy)
    result, rows = compress_retune(copy.deepcopy(trained), ALG2, evalset, train, rho=1.0, quench=1.5, max_rounds=2,
                                   epochs=1, learning_rate=1e-3, progress=False,
                                   on_round=lambda row, m: retuned_states.append(
                                       {k: v.clone() for k, v in m.state_dict().items()}))
    rounds = rows[:-1]
    assert [r["round"] for r in rounds] == [0, 1] and rows[-1]["round"] == "final"
    assert len(searched_states) == 3  # one search per round, the last one is the closing compression (line 12)
    # round 1 searched the weights round 0 left after retuning, not the trained ones
    assert searched_states[1].keys() == retuned_states[0].keys()
    assert all(torch.equal(searched_states[1][k], retuned_states[0][k]) for k in retuned_states[0])
    assert rounds[1]["non_embedding_params"] < rounds[0]["non_embedding_params"]
    # every round collapses at its own search's ε × q; round 1's ε's are not round 0's × q
    for r in rounds:
        assert r["epsilons"] == {k: min(v * 1.5, 1.99) for k, v in r["epsilons_searched"].items()}
    assert rounds[1]["epsilons_searched"] != rounds[0]["epsilons"]
    assert all(r["loss_retuned"] <= r["loss_compressed"] + 1e-9 and r["steps"] > 0 for r in rounds)
    assert rows[-1]["non_embedding_params"] <= rounds[1]["non_embedding_params"]
    assert evaluate_loss(result, evalset) == pytest.approx(rows[-1]["loss_retuned"], rel=1e-4)


def test_alg2_stops_at_the_bound_and_returns_the_last_model_within_it(setup, trained):
    _, train, evalset = setup
    base = evaluate_loss(trained, evalset)
    kwargs = dict(quench=2.0, max_rounds=2, epochs=1, learning_rate=0.0, progress=False)  # lr 0: no recovery
    _, probe = compress_retune(copy.deepcopy(trained), ALG2, evalset, train, rho=10.0, **kwargs)
    first, second = probe[0]["loss_retuned"], probe[1]["loss_retuned"]
    assert second > first > base
    rho = (first + second) / 2 / base - 1  # a bound that round 0 keeps and round 1 breaks
    result, rows = compress_retune(copy.deepcopy(trained), ALG2, evalset, train, rho=rho, **kwargs)
    assert [r["within_bound"] for r in rows[:-1]] == [True, False]
    final = rows[-1]
    assert final["ended"] == "bound" and final["within_bound"]
    assert evaluate_loss(result, evalset) <= base * (1 + rho) + 1e-9
    # the answer is round 0's model (plus its loss-preserving search), never the over-compressed round 1
    assert rows[1]["non_embedding_params"] < final["non_embedding_params"] <= rows[0]["non_embedding_params"]


def test_alg2_with_nothing_to_compress_returns_the_model_unchanged(setup, trained):
    _, train, evalset = setup
    frozen = FibrationConfig(tolerance=0.0, epsilon_max=0.0, search_steps=1, parts=("mlp",))
    result, rows = compress_retune(copy.deepcopy(trained), frozen, evalset, train, rho=0.05, epochs=1,
                                   progress=False)
    assert len(rows) == 1 and rows[0]["ended"] == "nothing left to compress"
    assert rows[0]["params"] == sum(p.numel() for p in trained.parameters())


def _causal_pair(train_teacher: bool = False):
    """A tiny GPT-2 student, and a teacher that (optionally) learned the data, so following it lowers the loss."""
    import tiny_models

    torch.manual_seed(0)
    student = tiny_models.FAMILIES["gpt2"]().eval()
    ids = torch.randint(3, 12, (4, 8, 12), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in ids]
    data = EvalSet("causal", batches, [b.numel() for b in ids])
    teacher = copy.deepcopy(student)
    if train_teacher:
        retune(teacher, data, data, epochs=10, learning_rate=1e-2, patience=10, progress=False)
    return teacher, student, data


def _kl(teacher, student, data):
    with torch.no_grad():
        return sum(float(kl_divergence(teacher(**b).logits, student(**b).logits, b["attention_mask"].bool(), 2.0))
                   for b in data.batches)


def test_distillation_lowers_the_kl_to_the_teacher(tmp_path):
    teacher, student, data = _causal_pair(train_teacher=True)
    before = _kl(teacher, student, data)
    retune(student, data, data, epochs=3, learning_rate=3e-3, patience=10, progress=False, teacher=teacher,
           distill_weight=1.0, distill_hidden_weight=0.1)
    assert _kl(teacher, student, data) < 0.7 * before
    assert not any(p.requires_grad for p in teacher.parameters())


def test_distillation_refuses_a_teacher_that_does_not_fit():
    teacher, student, data = _causal_pair()
    fidelity = EvalSet("fidelity", data.batches, data.weights)
    with pytest.raises(ValueError, match="fidelity loss"):
        retune(student, fidelity, fidelity, epochs=1, progress=False, teacher=teacher)
    import tiny_models

    other = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=tiny_models.VOCAB + 5, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="vocabulary"):
        retune(student, data, data, epochs=1, progress=False, teacher=other)
    with pytest.raises(ValueError, match="temperature"):
        retune(student, data, data, epochs=1, progress=False, teacher=teacher, distill_temperature=0)


class _Stop(Exception):
    pass


def test_alg2_resumed_round_by_round_equals_an_uninterrupted_run(setup, trained, tmp_path):
    _, train, evalset = setup
    kwargs = dict(rho=1.0, quench=1.5, max_rounds=2, epochs=1, eval_every=2, patience=2, learning_rate=1e-3,
                  progress=False)
    whole, whole_rows = compress_retune(copy.deepcopy(trained), ALG2, evalset, train, output_dir=tmp_path / "a",
                                        **kwargs)

    def interrupt(row: dict, model) -> None:
        if row["round"] == 1:
            raise _Stop  # killed after round 1's retuning, before the round is recorded

    with pytest.raises(_Stop):
        compress_retune(copy.deepcopy(trained), ALG2, evalset, train, output_dir=tmp_path / "b", on_round=interrupt,
                        **kwargs)
    assert [r["round"] for r in json.loads((tmp_path / "b" / "alg2.json").read_text())["rows"]] == [0]
    resumed, resumed_rows = compress_retune(copy.deepcopy(trained), ALG2, evalset, train, output_dir=tmp_path / "b",
                                            **kwargs)

    def timeless(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]

    assert len(whole_rows) >= 3 and timeless(resumed_rows) == timeless(whole_rows)
    assert resumed.state_dict().keys() == whole.state_dict().keys()
    assert all(torch.equal(resumed.state_dict()[k], whole.state_dict()[k]) for k in whole.state_dict())
    with pytest.raises(ValueError, match="other settings"):
        compress_retune(copy.deepcopy(trained), ALG2, evalset, train, output_dir=tmp_path / "b",
                        **{**kwargs, "quench": 1.2})


def test_alg2_ends_when_a_rounds_collapse_removes_nothing(setup, trained, monkeypatch):
    """A search can return ε's whose over-compression changes no size (the data-aware collapse of a retuned model
    did, round after round): the loop must end there instead of retuning the same model until max_rounds."""
    _, train, evalset = setup
    import hf_fibration.training.retune as module

    monkeypatch.setattr(module, "compress_pretrained", lambda model, *args, **kwargs: None)
    _, rows = compress_retune(copy.deepcopy(trained), ALG2, evalset, train, rho=1.0, quench=1.5, max_rounds=5,
                              epochs=1, learning_rate=1e-3, progress=False)
    assert [r["round"] for r in rows] == ["final"]
    assert rows[-1]["ended"] == "nothing left to compress" and rows[-1]["epsilons_searched"]


@pytest.mark.parametrize("distill", [True, False])
def test_alg2_distills_from_the_uncompressed_model_by_default(setup, trained, monkeypatch, distill):
    """Every round's retuning gets the model as it entered Alg. 2 as teacher (the measured best setting), frozen;
    ``distill=False`` retunes on the task loss alone."""
    _, train, evalset = setup
    import hf_fibration.training.retune as module

    teachers = []

    def spy(model, *args, **kwargs):
        teachers.append(kwargs.get("teacher"))
        return retune(model, *args, **kwargs)

    monkeypatch.setattr(module, "retune", spy)
    compress_retune(copy.deepcopy(trained), ALG2, evalset, train, rho=1.0, quench=1.5, max_rounds=2, epochs=1,
                    learning_rate=1e-3, progress=False, distill=distill)
    assert len(teachers) == 2
    if not distill:
        assert teachers == [None, None]
        return
    assert teachers[0] is teachers[1] and not any(p.requires_grad for p in teachers[0].parameters())
    original = trained.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in teachers[0].state_dict().items())
