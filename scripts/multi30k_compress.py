"""Greedy fibration compression alone vs the compress–retune loop (Alg. 2) on one Multi30k-trained Marian model
(the size series and its report: scripts/multi30k_series.py).

    python scripts/multi30k_compress.py runs/multi30k-d128 [--tolerance 0.01 --rho 0.041 --rounds 3]

Eval: val split (loss); BLEU: sacrebleu on test_2016_flickr; retuning on train pairs. Appends a markdown section
(command, machine, date, table per round) to results/multi30k.md.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import transformers as T

import hf_fibration  # noqa: F401  (registers the loader)
from hf_fibration import FibrationConfig
from hf_fibration.evaluation.evalset import evaluate_loss
from hf_fibration.evaluation.metrics import bleu
from hf_fibration.evaluation.results_io import preamble_markdown, print_preamble
from hf_fibration.models.surgery import non_embedding_parameters
from hf_fibration.policies.search import greedy_search
from hf_fibration.research.multi30k import DATA, batches, read_split
from hf_fibration.training.retune import compress_retune, retune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--rho", type=float, default=0.041)
    parser.add_argument("--quench", type=float, default=1.05)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--search-steps", type=int, default=6)
    parser.add_argument("--eval-samples", type=int, default=512)
    parser.add_argument("--train-samples", type=int, default=8192)
    parser.add_argument("--bleu-samples", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--control", action="store_true",
                        help="also retune the uncompressed model with one round's budget (is the gain compression's?)")
    parser.add_argument("--out", default="results/multi30k.md")
    args = parser.parse_args()
    head = print_preamble()
    data = Path(args.data)
    tok = T.AutoTokenizer.from_pretrained(args.model)
    base = T.AutoModelForSeq2SeqLM.from_pretrained(args.model).eval()
    val = batches(tok, *[s[: args.eval_samples] for s in read_split(data, "val")], 64, 64)
    train = batches(tok, *[s[: args.train_samples] for s in read_split(data, "train")], 128, 64)
    test_src, test_tgt = (s[: args.bleu_samples] for s in read_split(data, "test_2016_flickr"))
    rows = []

    def row(name: str, model, seconds: float, extra: str = "") -> None:
        rows.append((name, sum(p.numel() for p in model.parameters()), non_embedding_parameters(model),
                     evaluate_loss(model, val), bleu(model, tok, test_src, test_tgt), seconds, extra))
        print(rows[-1], flush=True)

    row("uncompressed", base, 0.0)
    config = FibrationConfig(tolerance=args.tolerance, search_steps=args.search_steps)
    greedy = copy.deepcopy(base)
    start = time.perf_counter()
    greedy_search(greedy, config, val, progress=True)
    search_seconds = time.perf_counter() - start
    row(f"greedy search, τ={args.tolerance}", greedy, search_seconds)
    start = time.perf_counter()
    retuned, rounds = compress_retune(copy.deepcopy(base), config, val, train, rho=args.rho, quench=args.quench,
                                      max_rounds=args.rounds, progress=False, base_loss=rows[0][3],
                                      epochs=args.epochs, learning_rate=args.lr, patience=1)
    row(f"compress–retune (Alg. 2, ρ={args.rho}, q={args.quench})", retuned, time.perf_counter() - start,
        f"{len(rounds) - 1} rounds")
    if args.control:
        control = copy.deepcopy(base)
        start = time.perf_counter()
        retune(control, train, val, epochs=args.epochs, learning_rate=args.lr, patience=1, progress=False)
        row("control: uncompressed, retuned with one round's budget", control, time.perf_counter() - start)
    base_ne = rows[0][2]
    lines = [f"\n## {Path(args.model).name}: greedy vs compress–retune", "", *preamble_markdown(head).splitlines(),
             f"- eval: {args.eval_samples} val pairs (loss); BLEU: sacrebleu, greedy decoding, first "
             f"{args.bleu_samples} test_2016_flickr pairs; retuning: {args.train_samples} train pairs, "
             f"{args.epochs} epoch(s) per round", "",
             "| model | parameters | non-embedding | ratio (non-emb.) | val loss | Δ loss | BLEU | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, params, ne, loss, b, sec, extra in rows:
        change = 100 * (loss / rows[0][3] - 1)
        lines.append(f"| {name} {extra} | {params:,} | {ne:,} | {base_ne / ne:.2f}x | {loss:.4f} | {change:+.2f}% | "
                     f"{b:.2f} | {sec:.0f} |")
    lines += ["", "| round | parameters | non-embedding | loss after compression | loss after retuning | "
                  "within bound |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['params']:,} | {r['non_embedding_params']:,} | {r['loss_compressed']:.4f} | "
              f"{r['loss_retuned']:.4f} | {r['within_bound']} |" for r in rounds]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
