"""A few steps of each experiment script's code path (the full runs live in scripts/ and results/)."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

from conftest import PAIRS

ROOT = Path(__file__).resolve().parent.parent


def tiny_multi30k(folder: Path) -> Path:
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    splits = {"train": rows[:160], "val": rows[160:208], "test_2016_flickr": rows[208:]}
    for split, part in splits.items():
        for lang in ("de", "en"):
            with gzip.open(folder / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("\n".join(r[lang] for r in part) + "\n")
    return folder


def test_train_multi30k_few_steps_then_compress(tmp_path):
    data = tiny_multi30k(tmp_path)
    out = tmp_path / "model"
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_multi30k

    summary = train_multi30k.main(["--data", str(data), "--out", str(out), "--d-model", "32", "--vocab", "300",
                                   "--max-steps", "4", "--epochs", "2", "--batch-size", "32", "--no-progress"])
    assert summary["steps"] == 4 and summary["val_loss"] > 0 and 0 <= summary["test2016_bleu"] <= 100
    assert (out / "model.safetensors").exists() and (out / "results.json").exists()
    from hf_fibration.cli import main

    assert main(["compress", str(out), "--epsilon", "0.3", "--output", str(tmp_path / "fib"), "--no-progress",
                 "--max-samples", "16"]) == 0


def test_mlp_digits_script(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "mlp_digits.py"), "--hidden", "32",
                             "--epochs", "3", "--random-seeds", "1", "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "results.md").read_text()
    assert "| 0.00 |" in table and (tmp_path / "accuracy_vs_params.png").stat().st_size > 1000


def test_power_law_fit_recovers_exponent_and_interval_brackets_it():
    sys.path.insert(0, str(ROOT / "scripts"))
    import scaling_law

    exact = scaling_law.fit_power_law([1e4, 3e4, 1e5, 3e5, 1e6], [3.0 * p ** -0.05 for p in (1e4, 3e4, 1e5, 3e5, 1e6)])
    assert abs(exact["alpha"] - 0.05) < 1e-9 and abs(exact["L0"] - 3.0) < 1e-6 and exact["r2"] > 0.999999
    noisy = scaling_law.fit_power_law([1e4, 3e4, 1e5, 3e5, 1e6], [4.1, 3.9, 3.55, 3.5, 3.2])
    assert noisy["alpha_ci"][0] < noisy["alpha"] < noisy["alpha_ci"][1]
    assert noisy["L0_ci"][0] < noisy["L0"] < noisy["L0_ci"][1]


def test_scaling_law_and_baseline_bench_few_steps(tmp_path):
    from hf_fibration.evaluation.evalset import DEFAULT_TEXT

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_pretrained
    import scaling_law

    result = scaling_law.main(["--data", str(DEFAULT_TEXT), "--sizes", "16", "24", "32", "--layers", "1",
                               "--steps", "3", "--eval-every", "3", "--vocab", "300", "--search-steps", "1",
                               "--search-blocks", "16", "--runs", str(tmp_path / "runs"), "--out",
                               str(tmp_path / "out"), "--no-progress"])
    rows = result["rows"]
    assert len(rows) == 3 and all(r["after"]["non_embedding"] <= r["before"]["non_embedding"] for r in rows)
    assert [r["before"]["non_embedding"] for r in rows] == sorted(r["before"]["non_embedding"] for r in rows)
    assert (tmp_path / "out" / "scaling_law.png").stat().st_size > 1000
    assert "| 32 |" in (tmp_path / "out" / "results.md").read_text()

    bench = bench_pretrained.main(["--model", str(tmp_path / "runs" / "gpt2-d32"), "--data", str(DEFAULT_TEXT),
                                   "--keep", "0.5", "--calib", "4", "--eval", "8", "--methods", "random", "flap",
                                   "fibration-span", "--out", str(tmp_path / "bench")])
    half = [r for r in bench if r["keep"] == 0.5]
    assert len(half) == 6 and all(0.5 < r["fraction"] < 1.0 and r["quality"] > 0 for r in half)
    assert (tmp_path / "bench" / "val_loss_vs_params.png").stat().st_size > 1000
    sized = bench_pretrained.main(["--model", str(tmp_path / "runs" / "gpt2-d32"), "--data", str(DEFAULT_TEXT),
                                   "--keep", "0.5", "--calib", "4", "--eval", "8", "--methods", "random", "flap",
                                   "fibration-span", "fibration-target", "--compensation", "off", "--size", "--out",
                                   str(tmp_path / "bench-size")])
    half = [r for r in sized if r["keep"] == 0.5]  # heads and MLP units (MLP only for fibration) at the same size
    assert [r["method"] for r in half] == ["random", "flap", "fibration-span", "fibration-target"]
    assert len(half) == 4 and all(abs(r["fraction"] - 0.5) <= 0.005 for r in half)
    assert "at equal non-embedding size" in (tmp_path / "bench-size" / "results.md").read_text()

    import target_distill_lm

    lm = target_distill_lm.main(["--models", str(tmp_path / "runs" / "gpt2-d32"), "--data", str(DEFAULT_TEXT),
                                 "--keeps", "0.5", "--methods", "fibration", "flap", "--calib", "8", "--block", "32",
                                 "--stop-blocks", "4", "--steps", "2", "--out", str(tmp_path / "lm")])
    assert [r["method"] for r in lm] == ["fibration", "flap"]
    assert all(abs(r["non_embedding_kept"] - 0.5) <= 0.01 and r["val_retuned"] > 0 for r in lm)
    assert "| gpt2-d32 |" in (tmp_path / "lm" / "results.md").read_text()


def test_multi30k_series_all_stages_on_a_tiny_size(tmp_path):
    data = tiny_multi30k(tmp_path)
    sys.path.insert(0, str(ROOT / "scripts"))
    import multi30k_series

    runs, out = tmp_path / "runs", tmp_path / "out"
    multi30k_series.main(["all", "--data", str(data), "--runs", str(runs), "--out", str(out), "--sizes", "16",
                          "--vocab", "300", "--max-steps", "3", "--epochs", "1", "--taus", "0.2",
                          "--search-steps", "1", "--rounds", "1", "--retune-epochs", "1", "--bleu-limit", "4",
                          "--bleu-batch-size", "4", "--device", "cpu", "--control-seconds", "5"])
    record = json.loads((runs / "d16" / "compress.json").read_text())
    assert "errors" not in record and (runs / "d16" / "control.json").exists()
    greedy = record["greedy"]["paper:0.2"]
    assert greedy["non_embedding"] < record["base"]["non_embedding"]
    for criterion in ("random", "l2"):  # pruning baselines hold exactly the fibration model's unit counts
        assert record["baselines"][f"{criterion} @ greedy paper:0.2"]["non_embedding"] == greedy["non_embedding"]
    rounds = record["alg2"]["plain"]["rounds"]
    assert rounds[0]["round"] == 0 and rounds[-1]["round"] == "final"
    assert "| 16 |" in (out / "results.md").read_text() and (out / "fig3f_d16.png").stat().st_size > 1000
    assert json.loads((out / "rows.json").read_text())["rows"][0]["d_model"] == 16


def test_search_growth_bench_on_tiny_trained_lms(tmp_path):
    from hf_fibration.evaluation.evalset import DEFAULT_TEXT

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_search_growth
    import train_lm

    models = []
    for d, layers in ((16, 1), (16, 2), (24, 2)):
        out = tmp_path / f"llama-d{d}-l{layers}"
        train_lm.main(["--arch", "llama", "--d-model", str(d), "--layers", str(layers), "--heads", "2", "--steps",
                       "4", "--eval-every", "4", "--vocab", "300", "--block", "32", "--val-blocks", "8", "--data",
                       str(DEFAULT_TEXT), "--out", str(out), "--no-progress"])
        models.append(str(out))
    rows = bench_search_growth.main(["--models", *models, "--data", str(DEFAULT_TEXT), "--block", "32",
                                     "--examples", "16", "--out", str(tmp_path / "growth")])
    assert sorted((Path(r["model"]).name, r["search"]) for r in rows) == sorted(
        (Path(m).name, s) for m in models for s in ("block", "greedy"))
    for r in rows:  # the held-out check's promise, and the unseen blocks measured apart from both
        assert r["holdout_loss"] <= r["holdout_bound"] and r["non_embedding_after"] <= r["non_embedding_before"]
        assert r["unseen_base"] > 0 and "validation blocks after" in r["unseen_is"]
    text = (tmp_path / "growth" / "README.md").read_text()
    assert "block: CPU time ∝ non-embedding parameters^" in text and "greedy: CPU time ∝" in text
    assert (tmp_path / "growth" / "growth.png").stat().st_size > 1000
