"""train_multi30k's symmetry log (--symmetry-every, resumable) and emergence_multi30k's rendering, on a tiny run.

The data is the packaged Multi30k val pairs split three ways (tests/test_scripts.py's tiny_multi30k), so the test
needs neither ../shared/data/multi30k nor the network.
"""

import json
import sys
from pathlib import Path

from test_scripts import tiny_multi30k

ROOT = Path(__file__).resolve().parent.parent


def test_symmetry_log_resumes_and_renders(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import emergence_multi30k

    data, run, out = tiny_multi30k(tmp_path), tmp_path / "run", tmp_path / "out"
    tiny = ["--data", str(data), "--d-model", "16", "--heads", "2", "--layers", "1", "--vocab", "300",
            "--epochs", "3", "--batch-size", "32", "--bleu-limit", "4", "--symmetry-bleu", "4", "--no-progress",
            "--symmetry-every", "2", "--symmetry-eps", "0", "0.05", "--threads", "1"]
    emergence_multi30k.main(["--run", str(run), "--out", str(out), "--train", "--", *tiny, "--max-steps", "6"])
    sym = json.loads((run / "symmetry.json").read_text())
    assert [h["step"] for h in sym["history"]] == [0, 2, 4, 5, 6]  # every 2 steps and the epoch end (5 batches)
    assert sym["epsilons"] == [0.0, 0.05] and sym["steps_per_epoch"] == 5
    assert sym["site_units"] == {"model.encoder.layers.0.fc1": 16, "model.decoder.layers.0.fc1": 16}
    last = sym["history"][-1]
    for name in ("symmetry/covers@0", "symmetry/fibers@0.05", "symmetry/opfibers@0.05", "symmetry/cover_splits@0",
                 "symmetry/model.decoder.layers.0.fc1/covers@0.05", "weight_rms/in", "weight_rms/out", "seconds"):
        assert name in last, name
    assert last["symmetry/covers@0"] <= 32 and [b["step"] for b in sym["bleu"]] == [5]

    text = (out / "results.md").read_text()
    assert "| 5 | 1.00 |" in text and "@ε=0.05" in text and "model.encoder.layers.0.fc1" in text
    assert (out / "emergence.png").stat().st_size > 1000
    assert json.loads((out / "history.json").read_text())["history"] == sym["history"]
    (out / "results.md").write_text(text + "\n## Reading\n\nby hand\n")

    # resume from the step-6 checkpoint to step 8: the log keeps steps ≤ 6 and goes on; the Reading survives
    emergence_multi30k.main(["--run", str(run), "--out", str(out), "--train", "--", *tiny, "--max-steps", "8",
                             "--resume"])
    sym = json.loads((run / "symmetry.json").read_text())
    assert [h["step"] for h in sym["history"]] == [0, 2, 4, 5, 6, 8]
    assert "symmetry/cover_splits@0" not in sym["history"][-1]  # no split count across a resume
    assert (out / "results.md").read_text().endswith("## Reading\n\nby hand\n")
