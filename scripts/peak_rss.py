"""Peak resident memory of `hf-fibration compress` against the model's size (#15 item 5).

Each case runs the CLI in a child process and reads the child's peak RSS from getrusage (Linux: ru_maxrss in KiB).
The 100M+ causal LM is a randomly initialized Llama of SmolLM-135M's shape (30 layers, d 576, GQA 9/3, FFN 1536,
tied embeddings) with all-MiniLM-L6-v2's tokenizer: memory depends on shapes, not on what the weights learned.

    python scripts/peak_rss.py [--out results/peak_rss] [--search]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_fibration.results_io import preamble, preamble_markdown, write_rows  # noqa: E402


def llama_135m(path: Path) -> Path:
    import torch
    import transformers as T

    from hf_fibration.loading import default_model

    tok = T.AutoTokenizer.from_pretrained(default_model())
    config = T.LlamaConfig(vocab_size=len(tok), hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=2048,
                           tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    T.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


WRAPPER = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def measure(model: str, out: Path, extra: list[str]) -> dict:
    """One compress in a grandchild; a fresh wrapper process reports the peak RSS of that one run (KiB)."""
    command = [sys.executable, "-m", "hf_fibration.cli", "compress", model, "--output", str(out), "--no-progress",
               "--overwrite", "--device", "cpu", *extra]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", WRAPPER, *command], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak = int(result.stdout.strip().splitlines()[-1]) * 1024
    size = sum(f.stat().st_size for f in Path(model).glob("*.safetensors"))
    name = "all-MiniLM-L6-v2" if Path(model).name == "model" else Path(model).name
    return {"model": name, "options": " ".join(extra), "model_bytes": size, "peak_rss_bytes": peak,
            "ratio": round(peak / size, 2), "seconds": round(seconds, 1)}


def measure_baseline() -> dict:
    """Peak RSS of a process that only imports what the CLI imports (torch, transformers, datasets, the package)."""
    code = "import hf_fibration, hf_fibration.cli, hf_fibration.data, datasets, transformers"
    result = subprocess.run([sys.executable, "-c", WRAPPER, sys.executable, "-c", code], check=True,
                            capture_output=True, text=True)
    return {"model": "(imports only)", "options": "", "model_bytes": 0,
            "peak_rss_bytes": int(result.stdout.strip().splitlines()[-1]) * 1024, "ratio": None, "seconds": None}


def render(rows: list[dict], head: dict, out: Path) -> None:
    base = next((r["peak_rss_bytes"] for r in rows if r["model"] == "(imports only)"), None)
    lines = ["# Peak RSS of `hf-fibration compress`", "", preamble_markdown(head),
             "| model | options | weights (MB) | peak RSS (MB) | above the imports (MB) | (peak − imports) / weights "
             "| time (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        above = "" if base is None or not r["model_bytes"] else f"{(r['peak_rss_bytes'] - base) / 2**20:.0f}"
        ratio = "" if base is None or not r["model_bytes"] else \
            f"{(r['peak_rss_bytes'] - base) / r['model_bytes']:.1f}"
        lines.append(f"| {r['model']} | `{r['options'] or '-'}` | {r['model_bytes'] / 2**20:.0f} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} | {above} | {ratio} | {r['seconds'] or ''} |")
    lines += ["", "Peak RSS is the child's `ru_maxrss` (the whole process: Python, torch, transformers, datasets). "
              "The "
              "imports-only row is the floor every run pays; what the compression itself holds is the column "
              "above it. The 135M row is a randomly initialized Llama of SmolLM-135M's shape (no such checkpoint is "
              "available offline); memory depends on shapes, not on trained values. What bounds the rest: the "
              "model (one fp32 copy, compressed in place), the eval batches (`--max-samples`, `--max-length`, "
              "`--batch-size`), the cached block inputs of the search (the same sizes × d_model per block) and the "
              "float64 calibration activations of one MLP at a time (`FibrationConfig.calibration_tokens` × FFN "
              "width)."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/peak_rss")
    parser.add_argument("--search", action="store_true", help="also the README's default search on MiniLM (slow)")
    parser.add_argument("--baseline-only", action="store_true", help="add the imports-only row to --out's rows")
    args = parser.parse_args()
    from hf_fibration.loading import default_model

    out = Path(args.out)
    if args.baseline_only:  # add the imports-only row to an existing run
        data = json.loads((out / "rows.json").read_text())
        rows = [r for r in data.pop("rows") if r["model"] != "(imports only)"] + [measure_baseline()]
        for r in rows:
            r["model"] = "all-MiniLM-L6-v2" if r["model"] == "model" else r["model"]
        write_rows(out, rows, {k: data[k] for k in ("command", "machine", "date")})
        render(rows, data, out)
        return
    head = preamble()
    rows = [measure_baseline()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [(default_model(), ["--epsilon", "0.3"]),
                 (str(llama_135m(tmp / "llama-135m-random")), ["--epsilon", "0.3", "--parts", "mlp"])]
        if args.search:
            cases.insert(1, (default_model(), []))
        for model, extra in cases:
            rows.append(measure(model, tmp / "out", extra))
            print(rows[-1], flush=True)
    write_rows(out, rows, head)
    render(rows, head, out)


if __name__ == "__main__":
    main()
