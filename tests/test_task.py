"""A config.json without ``architectures``: the head is inferred (or given by --task), printed, never dropped."""

import json

import pytest
import torch
from tiny_checkpoints import save_tiny
from tiny_models import tiny_model

from hf_fibration.cli import main
from hf_fibration.integrations.loading import load_config, load_model, resolve_task


def _strip_architectures(path):
    config = json.loads((path / "config.json").read_text())
    config.pop("architectures", None)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _tiny_dir(tmp_path, family):
    path = tmp_path / family
    tiny_model(family).save_pretrained(path)
    return _strip_architectures(path)


@pytest.mark.parametrize("family,task,cls", [
    ("llama", "causal-lm", "LlamaForCausalLM"),  # untied: lm_head.weight in the file
    ("qwen2", "causal-lm", "Qwen2ForCausalLM"),  # tied: only the head model's prefixed weights say so
    ("gpt2", "causal-lm", "GPT2LMHeadModel"),
    ("marian", "seq2seq-lm", "MarianMTModel"),
    ("bert", "masked-lm", "BertForMaskedLM"),
])
def test_head_is_inferred_from_model_type_and_weight_names(tmp_path, family, task, cls):
    path = _tiny_dir(tmp_path, family)
    assert resolve_task(str(path), load_config(str(path)))[0] == task
    model = load_model(str(path))
    assert type(model).__name__ == cls
    original = tiny_model(family)
    assert sorted(model.state_dict()) == sorted(original.state_dict())  # every weight loaded, the head included


def test_a_bare_encoder_stays_bare(tmp_path):
    path = _strip_architectures(save_tiny(tmp_path / "enc", "encoder"))
    task, why = resolve_task(str(path), load_config(str(path)))
    assert task == "feature-extraction" and "no architectures" in why
    assert type(load_model(str(path))).__name__ == "BertModel"


def test_an_untied_lm_head_is_never_dropped(tmp_path):
    path = _tiny_dir(tmp_path, "llama")
    with pytest.raises(ValueError, match=r"would drop its head weights \(lm_head\.\*\).*--task"):
        load_model(str(path), task="feature-extraction")


def test_compress_prints_the_inferred_task_first_and_keeps_the_head(tmp_path, capsys):
    path = _strip_architectures(save_tiny(tmp_path / "lm", "causal"))
    out = tmp_path / "out"
    assert main(["compress", str(path), "--epsilon", "0.05", "--max-samples", "8", "--output", str(out),
                 "--no-progress"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("task: causal-lm (config.json names no architectures")
    record = json.loads((out / "fibration_report.json").read_text())
    assert record["task"] == "causal"  # next-token loss, not embedding fidelity
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_compress_task_flag(tmp_path, capsys):
    path = _strip_architectures(save_tiny(tmp_path / "mlm", "masked"))
    out = tmp_path / "out"
    assert main(["compress", str(path), "--task", "feature-extraction", "--epsilon", "0.05", "--max-samples", "8",
                 "--output", str(out), "--no-progress"]) == 2  # the MLM head would be dropped
    assert "would drop its head weights (cls.*)" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert main(["compress", str(path), "--task", "masked-lm", "--epsilon", "0.05", "--max-samples", "8",
                 "--output", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "task: masked-lm (--task)"
    assert json.loads((out / "fibration_report.json").read_text())["task"] == "masked"


def test_a_task_the_family_lacks_is_refused_in_one_line(tmp_path, capsys):
    path = _tiny_dir(tmp_path, "gpt2")
    out = tmp_path / "out"
    assert main(["compress", str(path), "--task", "seq2seq-lm", "--epsilon", "0.05", "--output", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hf-fibration: error: --task seq2seq-lm does not exist for gpt2 models in transformers; pass "
                   "another --task (or auto)."]
    assert not out.exists()
    torch.testing.assert_close(load_model(str(path))(torch.tensor([[3, 4]])).logits,
                               tiny_model("gpt2")(torch.tensor([[3, 4]])).logits)  # source untouched
