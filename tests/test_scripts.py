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
