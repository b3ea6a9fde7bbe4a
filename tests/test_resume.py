"""`retune --resume` after an interruption ends with the weights and history of an uninterrupted run (#15.4)."""

import copy
import json

import pytest
import torch
import transformers as T
from conftest import PAIRS

import hf_fibration.training.retune as retune_module
from hf_fibration.cli import main
from hf_fibration.evaluation.evalset import build_eval_set, load_split
from hf_fibration.training.retune import STATE_DIR, retune
from hf_fibration.training.retune_state import complete_state


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    rows = PAIRS.read_text().splitlines()
    folder = tmp_path_factory.mktemp("resume-splits")
    (folder / "train.jsonl").write_text("\n".join(rows[:192]))
    (folder / "eval.jsonl").write_text("\n".join(rows[192:256]))
    return folder


@pytest.fixture(scope="module")
def setup(marian_dir, splits):
    model = T.MarianMTModel.from_pretrained(marian_dir).eval()
    assert model.config.dropout > 0  # the resumed run must replay the dropout draws too
    tok = T.AutoTokenizer.from_pretrained(marian_dir)
    train = build_eval_set(model, tok, load_split(str(splits / "train.jsonl")), batch_size=32, max_length=32)
    evalset = build_eval_set(model, tok, load_split(str(splits / "eval.jsonl")), batch_size=32, max_length=32)
    return model, train, evalset


def _interrupt_after(monkeypatch, calls: int, error: type[BaseException] = RuntimeError) -> None:
    """The ``calls``-th checkpoint is written completely, then the run dies."""
    real, seen = retune_module.save_state, []

    def dying(*args, **kwargs):
        real(*args, **kwargs)
        seen.append(1)
        if len(seen) == calls:
            raise error("killed")

    monkeypatch.setattr(retune_module, "save_state", dying)


@pytest.mark.parametrize("calls", [2, 3])  # step 8: mid-epoch 2; step 12: the end of epoch 2 (6 batches an epoch)
def test_resume_after_an_interruption_matches_the_uninterrupted_run(setup, tmp_path, monkeypatch, calls):
    model, train, evalset = setup
    kwargs = dict(epochs=3, eval_every=4, learning_rate=1e-3, patience=100, progress=False)
    whole = copy.deepcopy(model)
    expected = retune(whole, train, evalset, output_dir=tmp_path / "whole", **kwargs)
    assert expected.steps == 18 and len(expected.history) == 5

    with monkeypatch.context() as patch:
        _interrupt_after(patch, calls)
        with pytest.raises(RuntimeError, match="killed"):
            retune(copy.deepcopy(model), train, evalset, output_dir=tmp_path / "cut", **kwargs)
    state = json.loads((tmp_path / "cut" / STATE_DIR / "trainer.json").read_text())
    assert state["step"] == 4 * calls
    resumed = copy.deepcopy(model)  # fresh weights: everything must come from the checkpoint
    result = retune(resumed, train, evalset, output_dir=tmp_path / "cut", resume=True, **kwargs)
    assert result.to_dict() == expected.to_dict()
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_kill_between_the_renames_leaves_the_previous_checkpoint(setup, tmp_path):
    model, train, evalset = setup
    retune(copy.deepcopy(model), train, evalset, epochs=1, max_steps=2, eval_every=2, learning_rate=1e-3,
           output_dir=tmp_path, progress=False)
    state = tmp_path / STATE_DIR
    assert complete_state(state) == state and not list(tmp_path.glob(f"{STATE_DIR}.*"))
    state.rename(tmp_path / f"{STATE_DIR}.old")  # the new one was never moved in
    assert complete_state(state) == tmp_path / f"{STATE_DIR}.old"
    result = retune(copy.deepcopy(model), train, evalset, epochs=1, max_steps=4, eval_every=2, learning_rate=1e-3,
                    output_dir=tmp_path, resume=True, progress=False)
    assert [h["step"] for h in result.history] == [2, 4]


def test_cli_retune_resume_matches_the_uninterrupted_run(marian_dir, splits, tmp_path, monkeypatch, capsys):
    data = ["--dataset", str(splits / "eval.jsonl"), "--max-length", "32", "--batch-size", "32", "--no-progress"]
    fib = tmp_path / "fib"
    assert main(["compress", str(marian_dir), "--epsilon", "0.5", "--parts", "mlp", "--output", str(fib), *data]) == 0
    retune_args = ["retune", str(fib), "--train-dataset", str(splits / "train.jsonl"), "--train-samples", "192",
                   "--epochs", "3", "--lr", "1e-3", "--patience", "10", *data]
    assert main([*retune_args, "--output", str(tmp_path / "whole")]) == 0
    assert not (tmp_path / ".whole.retune").exists()  # the checkpoint goes once the output is written

    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1, KeyboardInterrupt)  # the end of epoch 1
        assert main([*retune_args, "--output", str(tmp_path / "cut")]) == 130
    assert not (tmp_path / "cut").exists() and (tmp_path / ".cut.retune").exists()
    capsys.readouterr()
    # #27.5: changed arguments are refused in one line naming them, and the checkpoint stays for a real resume
    assert main([*retune_args, "--output", str(tmp_path / "cut"), "--resume", "--lr", "5e-4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lr 0.001" in err[0] and "--lr 0.0005" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "cut").exists() and (tmp_path / ".cut.retune" / STATE_DIR).exists()
    assert main([*retune_args, "--output", str(tmp_path / "cut"), "--resume", "--device", "cpu"]) == 0
    assert "resuming from step" in capsys.readouterr().err
    whole, cut = (json.loads((tmp_path / d / "fibration_report.json").read_text()) for d in ("whole", "cut"))
    assert cut["retune"] == whole["retune"] and cut["metrics"] == whole["metrics"]
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors"
                                                                      ).read_bytes()
