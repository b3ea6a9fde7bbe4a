"""Every bad input, tampered file and failed push: exit status 2, one line that says what to do, no traceback,
no output directory left behind (#15 item 2, #18 items 3-5 and 7)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T
from hub_server import LoopbackHub
from safetensors.torch import load_file, save_file
from tiny_checkpoints import save_tiny

from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.cli import main

# (id, argv with {placeholders}, a piece of the one-line message that names the fix)
ROWS = [
    ("unknown-hub-id", ["compress", "no-such-org/no-such-model-xyz"], "Cannot load model"),
    ("missing-local-dir", ["compress", "./missing-dir-xyz"], "No such local directory"),
    ("unsupported-architecture", ["compress", "{vit}"], "Unsupported architecture"),
    ("missing-tokenizer", ["compress", "{no_tokenizer}"], "save the tokenizer"),
    ("unknown-dataset", ["compress", "{marian}", "--dataset", "no-such-dataset-xyz"], "no-such-dataset-xyz"),
    ("wrong-split", ["compress", "{marian}", "--dataset", "{data_dir}", "--split", "nope"], "--split"),
    ("wrong-column", ["compress", "{marian}", "--dataset", "{pairs}", "--source-column", "nope"], "--source-column"),
    ("empty-split", ["compress", "{marian}", "--dataset", "{empty}"], "empty"),
    # #27.7
    ("bad-config-dtype", ["evaluate", "{bad_dtype}"], "not a torch dtype"),
    ("mps-unavailable", ["evaluate", "{marian}", "--device", "mps"], "--device cpu"),
    ("holdout-too-small", ["compress", "{marian}", "--max-samples", "4"], "pass --max-samples 15 or more"),
    ("holdout-too-small-data", ["compress", "{marian}", "--dataset", "{pairs}"], "--holdout-fraction 0"),
    # #27.6: conflicting flags are refused, not resolved silently
    ("epsilon-and-target", ["compress", "{marian}", "--epsilon", "0.3", "--target-params", "0.5"],
     "Pass --epsilon or --target-params, not both"),
    ("epsilon-and-lossless", ["compress", "{marian}", "--epsilon", "0.3", "--lossless"], "not both"),
    ("tolerance-and-epsilon", ["compress", "{marian}", "--tol", "0.1", "--epsilon", "0.3"],
     "Pass --tolerance or --epsilon"),
    ("holdout-and-epsilon", ["compress", "{marian}", "--epsilon", "0.3", "--holdout-fraction", "0.2"], "not both"),
    ("cut-pricing-and-epsilon", ["compress", "{marian}", "--epsilon", "0.3", "--cut-pricing", "local"],
     "Pass --cut-pricing or --epsilon, not both"),
    ("layer-losses-without-epsilon", ["compress", "{marian}", "--layer-losses"], "only with --epsilon"),
    ("train-data-without-retune", ["compress", "{marian}", "--epsilon", "0.3", "--train-dataset", "{pairs}"],
     "--train-dataset applies only with --retune"),
    ("distill-weight-without-distill", ["retune", "{compressed}", "--train-dataset", "{text}", "--distill-weight",
                                        "0.3"], "only with --distill"),
    ("no-distill-with-distill-weight", ["compress", "{marian}", "--retune", "--train-dataset", "{pairs}",
                                        "--no-distill", "--distill-weight", "0.3"], "only with --distill"),
    ("private-without-push", ["compress", "{marian}", "--private"], "only with --push-to-hub"),
    # #27.4: data files that do not parse
    ("latin1-text", ["compress", "{marian}", "--dataset", "{latin1}"], "is not UTF-8"),
    ("binary-text", ["compress", "{marian}", "--dataset", "{binary}"], "looks binary"),
    ("broken-jsonl", ["compress", "{marian}", "--dataset", "{broken_jsonl}"], "JSON Lines"),
    ("broken-csv", ["compress", "{marian}", "--dataset", "{broken_csv}"], "CSV with a header row"),
    ("broken-train-jsonl", ["retune", "{compressed}", "--train-dataset", "{broken_jsonl}"], "JSON Lines"),
    ("over-long-sequences", ["compress", "{marian}", "--max-length", "100000"], "--max-length 128 or less"),
    ("epsilon-out-of-range", ["compress", "{marian}", "--epsilon", "2.5"], "--epsilon must lie in [0, 2)"),
    ("tolerance-negative", ["compress", "{marian}", "--tolerance", "-1"], "--tolerance must be"),
    ("max-samples-zero", ["compress", "{marian}", "--max-samples", "0"], "--max-samples must be"),
    ("batch-size-zero", ["evaluate", "{marian}", "--batch-size", "0"], "--batch-size must be"),
    # checked by FibrationConfig alone, in the CLI's words
    ("search-steps-zero", ["compress", "{marian}", "--search-steps", "0"], "--search-steps must be ≥ 1"),
    ("target-params-above-one", ["compress", "{marian}", "--target-params", "1.5"], "--target-params must lie in"),
    ("holdout-fraction-one", ["compress", "{marian}", "--holdout-fraction", "1"], "--holdout-fraction must lie in"),
    ("nan-weights", ["compress", "{nan_marian}"], "NaN"),
    ("cuda-on-cpu-torch", ["compress", "{marian}", "--device", "cuda"], "--device cpu"),
    ("bad-device", ["evaluate", "{marian}", "--device", "tpu9"], "--device cpu"),
    ("base-model-path", ["compress", "{marian}", "--base-model", "/some/path"], "not a hub model id"),
    ("retune-not-compressed", ["retune", "{marian}", "--train-dataset", "{pairs}"], "compress it first"),
    ("retune-without-train-data", ["compress", "{marian}", "--epsilon", "0.1", "--retune"], "--train-dataset"),
    ("evaluate-truncated", ["evaluate", "{truncated}"], "cut off"),
    ("evaluate-index-in-config", ["evaluate", "{bad_spec_index}"], "fiber_index value outside"),
    ("evaluate-index-in-weights", ["evaluate", "{bad_buffer_index}"], "fiber index outside"),
    ("evaluate-crafted-width", ["evaluate", "{huge_width}"], "wider than the base model"),
    ("evaluate-shape-vs-header", ["evaluate", "{shape_mismatch}"], "weights file holds"),
    ("evaluate-nan", ["evaluate", "{nan_compressed}"], "NaN"),
    # #27.3: integrity at load: digests of every tensor, finite weights, fiber indices that are real maps
    ("evaluate-bytes-flipped", ["evaluate", "{bytes_flipped}"], "does not match the sha256 digest"),
    ("evaluate-index-permuted", ["evaluate", "{permuted_index}"], "order of first use"),
    ("evaluate-index-not-onto", ["evaluate", "{index_not_onto}"], "never uses fiber"),
    ("evaluate-config-index-moved", ["evaluate", "{moved_config_index}"], "does not match the digest"),
    ("push-not-compressed", ["push", "{marian}", "user/x"], "compress it first"),
    ("push-bad-repo-id", ["push", "{compressed}", "no-namespace"], "user-or-org/"),
    ("push-401", ["push", "{compressed}", "user/x", "@401"], "check the token"),
    ("push-404", ["push", "{compressed}", "user/x", "@404"], "check the repo id"),
    ("push-500", ["push", "{compressed}", "user/x", "@500"], "retry later"),
    ("push-dropped-connection", ["push", "{compressed}", "user/x", "@drop"], "check the connection"),
    # #27.2: the output never replaces, contains or lies inside the input, nor deletes what hf-fibration did not write
    ("output-is-input", ["compress", "{copy}", "--output", "{copy}", "--overwrite"], "is the input model"),
    ("output-contains-input", ["compress", "{copy}", "--output", "{copy_parent}", "--overwrite"],
     "contains the input model"),
    ("output-inside-input", ["compress", "{copy}", "--output", "{copy}/sub"], "lies inside the input model"),
    ("retune-output-is-input", ["retune", "{compressed}", "--train-dataset", "{text}", "--output", "{compressed}",
                                "--overwrite"], "is the input model"),
    ("overwrite-foreign-dir", ["compress", "{marian}", "--output", "{foreign}", "--overwrite"],
     "--overwrite would delete"),
    ("output-is-a-file", ["compress", "{marian}", "--output", "{text}", "--overwrite"], "is an existing file"),
    ("output-under-a-file", ["compress", "{marian}", "--output", "{text}/x"], "lies under the file"),
]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A compressed tiny encoder (embeddings, attention and MLP sites) saved by the Python path."""
    root = tmp_path_factory.mktemp("bad-inputs")
    source = save_tiny(root / "encoder")
    model = T.AutoModel.from_pretrained(source).eval()
    compress_pretrained(model, FibrationConfig(epsilon=0.05))
    model.save_pretrained(root / "compressed")
    T.AutoTokenizer.from_pretrained(source).save_pretrained(root / "compressed")
    return root / "compressed"


def _tree(path):
    """A file's bytes, or a directory's files and their bytes: what a refused run must leave as it was."""
    if path.is_file():
        return path.read_bytes()
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def _variant(src, dst, edit_config=None, edit_tensors=None, truncate=False, edit_file=None):
    shutil.copytree(src, dst)
    if edit_file is not None:
        edit_file(dst / "model.safetensors")
    if edit_config is not None:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config["quantization_config"]["modules"])
        (dst / "config.json").write_text(json.dumps(config))
    if edit_tensors is not None:
        tensors = load_file(dst / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if truncate:
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    return dst


def _first(modules, kind, full=False):
    return next(s for s in modules.values() if s["kind"] == kind and (not full or s.get("full_width")))


def _set_spec_index(modules):
    _first(modules, "embedding")["fiber_index"][0] = 10**6


def _set_buffer_index(tensors):
    key = next(k for k in tensors if k.endswith("fiber_index"))
    tensors[key][0] = 10**6


def _huge_width(modules):
    _first(modules, "linear")["out_features"] = 4_000_000_000


def _shape_mismatch(modules):
    spec = next(s for s in modules.values() if s["kind"] == "linear" and s["out_features"] > 1)
    spec["out_features"] -= 1


def _flip_bytes(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))


def _fiber_indices(tensors):
    return next(k for k, v in tensors.items() if k.endswith("fiber_index") and len(set(v.tolist())) > 2)


def _permute_index(tensors):
    key = _fiber_indices(tensors)
    tensors[key] = tensors[key].flip(0).contiguous()  # in range, onto, but not a map the compression writes


def _index_not_onto(tensors):
    key = _fiber_indices(tensors)
    tensors[key][tensors[key] == int(tensors[key].max())] = 0


def _move_config_index(modules):
    """Reassign one slot of the embedding's index to fiber 0: still in range, onto and in first-use order."""
    index = _first(modules, "embedding")["fiber_index"]
    j = next(j for j in range(1, len(index)) if index[j] != 0 and index.index(index[j]) < j)
    index[j] = 0


def _nan(tensors):
    key = next(k for k in tensors if k.endswith("intermediate.dense.weight"))
    tensors[key][0, 0] = float("nan")


@pytest.fixture(scope="module")
def places(tmp_path_factory, marian_dir, compressed):
    root = tmp_path_factory.mktemp("bad-input-files")
    T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64).save_pretrained(
        root / "vit")
    T.BertModel(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=64)).save_pretrained(root / "no_tokenizer")
    (root / "empty.txt").write_text("")
    (root / "pairs.jsonl").write_text('{"de": "Hallo", "en": "Hello"}\n')
    (root / "data_dir").mkdir()
    (root / "data_dir" / "train.jsonl").write_text('{"de": "Hallo", "en": "Hello"}\n')
    nan_marian = root / "nan_marian"
    shutil.copytree(marian_dir, nan_marian)
    tensors = load_file(nan_marian / "model.safetensors")
    key = next(k for k in tensors if k.endswith("fc1.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, nan_marian / "model.safetensors", metadata={"format": "pt"})
    copy = shutil.copytree(marian_dir, root / "copy_parent" / "copy")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("mine")
    (root / "text.txt").write_text("A line of text.\n" * 4)
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (root / "broken.jsonl").write_text('{"de": "Hallo", "en": "Hello"}\n{"de": broken\n')
    (root / "broken.csv").write_text('de,en\n"Hallo,Hello\n1,2,3,4\n')
    bad_dtype = shutil.copytree(compressed, root / "bad_dtype")
    config = json.loads((bad_dtype / "config.json").read_text())
    (bad_dtype / "config.json").write_text(json.dumps({**config, "dtype": "float99"}))
    return {"bad_dtype": bad_dtype, "latin1": root / "latin1.txt", "binary": root / "binary.txt",
            "broken_jsonl": root / "broken.jsonl",
            "broken_csv": root / "broken.csv", "copy": copy, "copy_parent": copy.parent, "foreign": root / "foreign",
            "text": root / "text.txt",
            "marian": marian_dir, "compressed": compressed, "vit": root / "vit", "no_tokenizer": root / "no_tokenizer",
            "empty": root / "empty.txt", "pairs": root / "pairs.jsonl", "data_dir": root / "data_dir",
            "nan_marian": nan_marian,
            "truncated": _variant(compressed, root / "truncated", truncate=True),
            "bad_spec_index": _variant(compressed, root / "bad_spec_index", edit_config=_set_spec_index),
            "bad_buffer_index": _variant(compressed, root / "bad_buffer_index", edit_tensors=_set_buffer_index),
            "huge_width": _variant(compressed, root / "huge_width", edit_config=_huge_width),
            "shape_mismatch": _variant(compressed, root / "shape_mismatch", edit_config=_shape_mismatch),
            "nan_compressed": _variant(compressed, root / "nan_compressed", edit_tensors=_nan),
            "bytes_flipped": _variant(compressed, root / "bytes_flipped", edit_file=_flip_bytes),
            "permuted_index": _variant(compressed, root / "permuted_index", edit_tensors=_permute_index),
            "index_not_onto": _variant(compressed, root / "index_not_onto", edit_tensors=_index_not_onto),
            "moved_config_index": _variant(compressed, root / "moved_config_index", edit_config=_move_config_index)}


@pytest.mark.parametrize("argv, message", [pytest.param(a, m, id=i) for i, a, m in ROWS])
def test_bad_input(places, tmp_path, monkeypatch, capsys, argv, message):
    import huggingface_hub.constants as constants

    argv = [a.format(**places) for a in argv]
    failure = next((a[1:] for a in argv if a.startswith("@")), None)
    argv = [a for a in argv if not a.startswith("@")]
    out = tmp_path / "out"
    if argv[0] in ("compress", "retune"):
        argv += (["--output", str(out)] if "--output" not in argv else []) + ["--no-progress"]
    watched = [Path(a) for a in argv[1:] if Path(a).exists()]  # the source and any existing output: untouched
    before = [_tree(p) for p in watched]
    if argv[0] in ("compress", "retune", "evaluate") and "--device" not in argv:
        argv += ["--device", "cpu"]
    with LoopbackHub() as hub:
        if failure is not None:
            hub.state.fail_status = None if failure == "drop" else int(failure)
            hub.state.drop_connections = failure == "drop"
            monkeypatch.setattr(constants, "ENDPOINT", hub.url)
            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
            monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
            monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda s: None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU-only torch of #18.5, anywhere
        code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hf-fibration: error")]
    assert code == 2, err
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert [_tree(p) for p in watched] == before
    if "--output" in argv:
        target = Path(argv[argv.index("--output") + 1])
        assert not list(target.parent.glob(f".{target.name}.tmp-*")) if target.parent.is_dir() else True
    if argv[0] == "push":
        assert not (places["compressed"] / "README.md").exists()


@pytest.mark.parametrize("variant, message", [("truncated", "cut off: module"), ("bad_spec_index", "fiber_index"),
                                              ("bytes_flipped", "sha256"), ("nan_compressed", "NaN"),
                                              ("permuted_index", "first use"),
                                              ("bad_buffer_index", "fiber index outside"),
                                              ("huge_width", "wider than the base model")])
def test_plain_from_pretrained_refuses_damaged_checkpoints_in_one_line(places, variant, message):
    """The quantizer itself checks (the Python path): a one-line error naming the module, before any forward."""
    from hf_fibration.integrations.quantizer import CheckpointError

    with pytest.raises(CheckpointError) as info:
        T.AutoModel.from_pretrained(places[variant])
    assert message in str(info.value) and "\n" not in str(info.value) and "'" in str(info.value)
