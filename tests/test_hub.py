import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hub_server import LoopbackHub
from huggingface_hub import ModelCard
from tiny_models import inputs, plant_fibers, tiny_model

from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.publish import REPORT_FILE, PushError, push_to_hub

PUSH_AND_PULL = textwrap.dedent("""
    import sys, torch, hf_fibration, transformers as T
    from safetensors.torch import load_file, save_file
    from hf_fibration.publish import push_to_hub
    folder, repo, private = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    print(push_to_hub(folder, repo, private=private))
    model = T.AutoModelForCausalLM.from_pretrained(repo).eval()
    batch = load_file(folder + "/inputs.safetensors")
    with torch.no_grad():
        save_file({"logits": model(**batch).logits.contiguous()}, folder + "/../pulled.safetensors")
""")


@pytest.fixture
def checkpoint(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model("llama")
    plant_fibers(model)
    report = compress_pretrained(model, FibrationConfig(epsilon=0.0))
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    record = {"base_model": "meta-llama/Tiny-Llama", "task": "causal", "command": "hf-fibration compress ...",
              "config": {"tolerance": 0.01}, "report": report.to_dict(),
              "metrics": {"before": {"loss": 4.1, "perplexity": 60.3}, "after": {"loss": 4.2, "perplexity": 66.7}}}
    (folder / REPORT_FILE).write_text(json.dumps(record))
    batch = inputs(model)
    save_file(batch, folder / "inputs.safetensors")
    with torch.no_grad():
        logits = model(**batch).logits
    return folder, logits


def hub_env(hub, tmp_path):
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_loopback_token", "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.mark.parametrize("private", [False, True])
def test_push_then_from_pretrained_gives_identical_logits(checkpoint, tmp_path, private):
    from safetensors.torch import load_file

    folder, logits = checkpoint
    with LoopbackHub() as hub:
        result = subprocess.run([sys.executable, "-c", PUSH_AND_PULL, str(folder), "user/tiny-llama-fib",
                                 "1" if private else "0"], env=hub_env(hub, tmp_path), capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        repo = hub.state.repos["user/tiny-llama-fib"]
        assert repo["private"] is private
        files = repo["branches"]["main"]["files"]
    assert {"README.md", "config.json", "model.safetensors", REPORT_FILE} <= set(files)
    pulled = load_file(tmp_path / "pulled.safetensors")["logits"]
    torch.testing.assert_close(pulled, logits, atol=0, rtol=0)
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "meta-llama/Tiny-Llama"
    assert card.data.library_name == "transformers" and "hf-fibration" in card.data.tags
    metrics = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert metrics["loss (uncompressed)"] == 4.1 and metrics["loss (compressed)"] == 4.2
    assert "import hf_fibration" in card.text and "| model.layers.0.mlp.up_proj |" in card.text


def test_failing_push_keeps_the_checkpoint_and_says_so(checkpoint, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    folder, _ = checkpoint
    before = sorted(p.name for p in folder.iterdir())
    with LoopbackHub() as hub:
        hub.state.fail_uploads = True
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda s: None)  # the client retries 5xx
        with pytest.raises(PushError) as info:
            push_to_hub(folder, "user/broken", token="hf_x")
    assert "\n" not in str(info.value) and "intact" in str(info.value) and "500" in str(info.value)
    assert "user/broken" in hub.state.repos  # the request reached the loopback server
    after = sorted(p.name for p in folder.iterdir())
    assert set(before) <= set(after) and (folder / "model.safetensors").stat().st_size > 0


def test_push_refuses_a_directory_without_report(tmp_path):
    with pytest.raises(ValueError, match="fibration_report.json"):
        push_to_hub(tmp_path, "user/x")
