"""Peak resident memory of `hf-fibration compress` against the model's size (#15 item 5).

Each case runs the CLI in a child process and reads the child's peak RSS from getrusage (Linux: ru_maxrss in KiB).
The 100M+ causal LM is a randomly initialized Llama of SmolLM-135M's shape (30 layers, d 576, GQA 9/3, FFN 1536,
tied embeddings) with all-MiniLM-L6-v2's tokenizer: memory depends on shapes, not on what the weights learned.
Two floors are measured every run: the imports alone, and the imports plus one forward pass of a tiny BERT (the
kernels and library code a first forward pages in, whatever the model's size). Rows of cases not run this time are
kept from the previous rows.json with the date they were measured.

    python scripts/peak_rss.py [--out results/peak_rss] [--cases minilm,llama-135m] [--search]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hf_fibration.evaluation.results_io import preamble, preamble_markdown, write_rows


def llama_135m(path: Path) -> Path:
    import torch
    import transformers as T

    from hf_fibration.integrations.checkpoint_io import default_model

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


CASES = {  # name → (model, options); the model "default" is the packaged all-MiniLM-L6-v2, "llama" the 135M LM
    "minilm": ("default", ["--epsilon", "0.3"]),
    "minilm-calib2048": ("default", ["--epsilon", "0.3", "--calibration-tokens", "2048"]),
    "minilm-search": ("default", []),
    "llama-135m": ("llama", ["--epsilon", "0.3", "--parts", "mlp"]),
}


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


IMPORTS = "import hf_fibration, hf_fibration.cli, hf_fibration.evaluation.evalset, datasets, transformers"
FORWARD = ("; import torch; c = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, "
           "num_attention_heads=4, intermediate_size=64); m = transformers.BertModel(c).eval(); "
           "torch.no_grad()(m)(input_ids=torch.ones(1, 8, dtype=torch.long))")
FLOORS = {"(imports only)": IMPORTS, "(imports + a first forward)": IMPORTS + FORWARD}


def measure_baseline(name: str = "(imports only)") -> dict:
    """Peak RSS of a process that only imports what the CLI imports (torch, transformers, datasets, the package),
    or also runs one forward of a tiny BERT."""
    result = subprocess.run([sys.executable, "-c", WRAPPER, sys.executable, "-c", FLOORS[name]], check=True,
                            capture_output=True, text=True)
    return {"model": name, "options": "", "model_bytes": 0,
            "peak_rss_bytes": int(result.stdout.strip().splitlines()[-1]) * 1024, "ratio": None, "seconds": None}


def render(rows: list[dict], head: dict, out: Path) -> None:
    base = next((r["peak_rss_bytes"] for r in rows if r["model"] == "(imports only)"), None)
    warm = next((r["peak_rss_bytes"] for r in rows if r["model"] == "(imports + a first forward)"), None)

    def share(r: dict, floor: int | None) -> str:
        if floor is None or not r["model_bytes"]:
            return ""
        return f"{(r['peak_rss_bytes'] - floor) / r['model_bytes']:.1f}"

    lines = ["# Peak RSS of `hf-fibration compress`", "", preamble_markdown(head),
             "| model | options | weights (MB) | peak RSS (MB) | above the imports (MB) | (peak − imports) / weights "
             "| (peak − imports − first forward) / weights | time (s) | measured | every run's peak (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        above = "" if base is None or not r["model_bytes"] else f"{(r['peak_rss_bytes'] - base) / 2**20:.0f}"
        lines.append(f"| {r['model']} | `{r['options'] or '-'}` | {r['model_bytes'] / 2**20:.0f} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} | {above} | {share(r, base)} | {share(r, warm)} | "
                     f"{r['seconds'] or ''} | {r.get('date', head['date'])} | "
                     f"{', '.join(f'{p / 2**20:.0f}' for p in r.get('peaks_bytes', []))} |")
    lines += ["", "Peak RSS is the child's `ru_maxrss` (the whole process: Python, torch, transformers, "
              "datasets); with `--repeats`, the row is the median run. "
              "Two floors every run pays: the imports, and the kernels and library code that a first forward pages "
              "in (a tiny BERT's forward, whatever the model's size). The 135M row is a randomly initialized Llama "
              "of SmolLM-135M's shape (no such checkpoint is available offline); memory depends on shapes, not on "
              "trained values. What the compression holds above the floors: the model (one fp32 copy, compressed in "
              "place; the τ search keeps one more to restore when the held-out check fails), the eval batches "
              "(`--max-samples`, `--max-length`, `--batch-size`), the search's cached block outputs (the same sizes "
              "× d_model), the float64 rows of one site's dendrogram, and one MLP's calibration refit at a time: its "
              "captured inputs (tokens × d_model, `--calibration-tokens`, default 8192), read 1024 tokens at a time "
              "into float64 ridge statistics (width² per cell: one cell while fitting, two once a refit is "
              "accepted; twice that where the search cross-fits) and the held-out quarter's rows (tokens/4 × "
              "(width + d_model)). `hf-fibration` fixes glibc's "
              "mmap threshold at 4 MB so that "
              "these buffers go back to the OS when freed (`hf_fibration.integrations.memory`)."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def median_run(runs: list[dict]) -> dict:
    """The run with the median peak (the upper one of an even count)."""
    return sorted(runs, key=lambda r: r["peak_rss_bytes"])[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/peak_rss")
    parser.add_argument("--cases", default="minilm,llama-135m", help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--search", action="store_true", help="also the README's default search on MiniLM (slow)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per case; the row is the median run (peaks vary by a few tens of MB run to run)")
    parser.add_argument("--render-only", action="store_true", help="rewrite README.md from --out's rows.json")
    args = parser.parse_args()
    from hf_fibration.integrations.checkpoint_io import default_model

    out = Path(args.out)
    if args.render_only:
        data = json.loads((out / "rows.json").read_text())
        render(data["rows"], data, out)
        return
    names = [c.strip() for c in args.cases.split(",") if c.strip()] + (["minilm-search"] if args.search else [])
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose among {', '.join(CASES)}")
    head = preamble()
    rows = [{**median_run([measure_baseline(name) for _ in range(args.repeats)]), "date": head["date"]}
            for name in FLOORS]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in names:
            model, extra = CASES[name]
            path = default_model() if model == "default" else str(llama_135m(tmp / "llama-135m-random"))
            runs = [measure(path, tmp / "out", extra) for _ in range(args.repeats)]
            rows.append({**median_run(runs), "peaks_bytes": [r["peak_rss_bytes"] for r in runs], "case": name,
                         "date": head["date"]})
            print(rows[-1], flush=True)
    rows = rows[len(FLOORS):] + _kept_rows(out, names, head) + rows[:len(FLOORS)]
    write_rows(out, rows, head)
    render(rows, head, out)


def _kept_rows(out: Path, names: list[str], head: dict) -> list[dict]:
    """The previous run's rows of the cases not measured now, with the date they were measured."""
    if not (out / "rows.json").exists():
        return []
    previous = json.loads((out / "rows.json").read_text())
    options = {" ".join(extra): case for case, (_, extra) in CASES.items()}
    kept = []
    for r in previous["rows"]:
        case = (r.get("case") or options.get(r["options"])) if r["model_bytes"] else None
        if case is not None and case not in names:
            kept.append({**r, "case": case, "date": r.get("date", previous["date"])})
    return kept


if __name__ == "__main__":
    main()
