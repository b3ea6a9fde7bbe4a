"""Peak resident memory of `hf-fibration compress` against the model's size (#15 item 5).

Each case runs the CLI in a child process and reads the child's peak RSS from getrusage (Linux: ru_maxrss in KiB).
The 100M+ causal LM is a randomly initialized Llama of SmolLM-135M's shape (30 layers, d 576, GQA 9/3, FFN 1536,
tied embeddings) with all-MiniLM-L6-v2's tokenizer: memory depends on shapes, not on what the weights learned.

    python scripts/peak_rss.py [--out results/peak_rss]
"""

from __future__ import annotations

import argparse
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
    return {"model": Path(model).name, "options": " ".join(extra), "model_bytes": size, "peak_rss_bytes": peak,
            "ratio": round(peak / size, 2), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/peak_rss")
    args = parser.parse_args()
    from hf_fibration.loading import default_model

    head = preamble()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [(default_model(), ["--epsilon", "0.3"]), (default_model(), []),
                 (str(llama_135m(tmp / "llama-135m-random")), ["--epsilon", "0.3", "--parts", "mlp"])]
        for model, extra in cases:
            rows.append(measure(model, tmp / "out", extra))
            print(rows[-1], flush=True)
    write_rows(args.out, rows, head)
    lines = ["# Peak RSS of `hf-fibration compress`", "", preamble_markdown(head),
             "| model | options | weights (MB) | peak RSS (MB) | peak / weights | time (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | `{r['options'] or '(search)'}` | {r['model_bytes'] / 2**20:.0f} | "
              f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['ratio']} | {r['seconds']} |" for r in rows]
    (Path(args.out) / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
