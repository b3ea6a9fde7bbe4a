import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import AUTO_CLASSES, FAMILIES, GENERATES, inputs, plant_fibers, tiny_model

from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.core import FiberLinear, count_parameters
from hf_fibration.core.embedding import FiberEmbedding

FRESH_PROCESS_LOADER = textwrap.dedent("""
    import sys, torch, hf_fibration, transformers as T
    from safetensors.torch import load_file, save_file
    path, auto, enc_dec, gen = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
    model = getattr(T, auto).from_pretrained(path).eval()
    tensors = load_file(path + "/inputs.safetensors")
    with torch.no_grad():
        out = {"logits": model(**tensors).logits.contiguous()}
        if gen:
            kw = {"input_ids": tensors["input_ids"], "max_new_tokens": 5, "do_sample": False,
                  "attention_mask": torch.ones_like(tensors["input_ids"])}
            out["generated"] = model.generate(**kw).contiguous()
    save_file(out, path + "/outputs.safetensors")
""")


def generate(model, batch):
    kw = {"input_ids": batch["input_ids"], "max_new_tokens": 5, "do_sample": False,
          "attention_mask": torch.ones_like(batch["input_ids"])}
    return model.generate(**kw)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exact_compression_and_fresh_process_round_trip(family, tmp_path):
    model = tiny_model(family)
    plant_fibers(model)
    batch = inputs(model)
    with torch.no_grad():
        reference = model(**batch).logits
    params_before = count_parameters(model)
    report = compress_pretrained(model, FibrationConfig(epsilon=0.0))
    assert report.layers, "planted fibers must be found"
    assert all(r.units_after < r.units_before for r in report.layers)
    assert count_parameters(model) < params_before == report.params_before
    assert report.params_after == count_parameters(model)
    assert any(isinstance(m, FiberLinear) and m.fiber_index is not None for m in model.modules())
    with torch.no_grad():
        logits = model(**batch).logits
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    generated = generate(model, batch) if family in GENERATES else None

    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "fibration" and saved["modules"]
    save_file({k: v.contiguous() for k, v in batch.items()}, tmp_path / "inputs.safetensors")
    auto = AUTO_CLASSES[family].__name__
    enc_dec = "1" if model.config.is_encoder_decoder else "0"
    gen = "1" if generated is not None else "0"
    subprocess.run([sys.executable, "-c", FRESH_PROCESS_LOADER, str(tmp_path), auto, enc_dec, gen], check=True,
                   capture_output=True)
    outputs = load_file(tmp_path / "outputs.safetensors")
    torch.testing.assert_close(outputs["logits"], logits, atol=0, rtol=0)
    if generated is not None:
        assert torch.equal(outputs["generated"], generated)


def test_embeddings_become_smaller_with_a_tied_head():
    model = tiny_model("gpt2")
    plant_fibers(model)
    compress_pretrained(model, FibrationConfig(epsilon=0.0, parts=("embeddings",)))
    emb = model.get_input_embeddings()
    assert isinstance(emb, FiberEmbedding) and emb.embedding_dim == 32 - 8
    assert model.get_output_embeddings().weight is emb.weight


def test_loading_without_import_fails_loudly(tmp_path):
    model = tiny_model("llama")
    plant_fibers(model)
    compress_pretrained(model, FibrationConfig(epsilon=0.0))
    model.save_pretrained(tmp_path)
    code = f"import transformers as T; T.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "hf-fibration" in json.loads((tmp_path / "config.json").read_text())["quantization_config"]["load_hint"]


def test_unsupported_architecture_lists_the_supported_families():
    import transformers as T

    model = T.T5ForConditionalGeneration(T.T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                                    d_kv=8))
    with pytest.raises(ValueError, match="Unsupported architecture 't5'.*bert.*llama") as info:
        compress_pretrained(model, FibrationConfig(epsilon=0.0))
    assert "\n" not in str(info.value)


def test_nan_weights_are_refused(monkeypatch):
    import hf_fibration.api as api

    model = tiny_model("bert")
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compress_pretrained(model, FibrationConfig(epsilon=0.0))
    monkeypatch.setattr(api, "FINITE_CHECK_CHUNK", 7)  # the weight read in chunks: an inf in the last one
    model = tiny_model("bert")
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight[-1, -1] = float("inf")
    with pytest.raises(ValueError, match="encoder.layer.1.output.dense.weight holds NaN or inf"):
        compress_pretrained(model, FibrationConfig(epsilon=0.0))
