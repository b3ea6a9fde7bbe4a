"""The command's default (`--search block --fibers-from span`) against the other search × fiber-source pairs on
models that are not the main job's, as `hf-fibration compress` runs them: compensated collapse, τ = 0.01, the
held-out check on half of the eval examples (the search never sees them).

    python scripts/bench_command_defaults.py [--models runs/seed-regime/d128 ...] [--samples 256]

A Marian directory searches on val pairs and is measured on test_2016_flickr (1,000 pairs); "minilm" searches on
wikitext-2 valid lines and is measured by 1 − cos on wikitext-2 test lines (see bench_block_search.sets). Writes
results/command_defaults/README.md and rows.json (a rerun skips rows already there).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from bench_block_search import sets

from hf_fibration import FibrationConfig
from hf_fibration.evaluation.evalset import evaluate_loss
from hf_fibration.evaluation.results_io import (
    command_line,
    keep_row,
    preamble_markdown,
    print_preamble,
    read_rows,
)
from hf_fibration.policies.search import greedy_search

PAIRS = ["block:span", "block:weights", "greedy:span", "greedy:weights"]  # search:fibers_from[:cut_pricing]


def _settings(pair: str) -> tuple[str, str, str]:
    how, source, *pricing = pair.split(":")
    return how, source, (pricing or ["forward"])[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["runs/seed-regime/d128"])
    parser.add_argument("--samples", type=int, default=256, help="eval examples (half held out)")
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/command_defaults")
    parser.add_argument("--pairs", nargs="+", default=PAIRS,
                        help="search:fibers_from[:cut_pricing] settings to run (cut pricing 'forward' if unnamed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    head = print_preamble(command_line(__file__, argv), load=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "rows.json"
    rows = read_rows(rows_file)
    for name in args.models:
        todo = [_settings(p) for p in args.pairs]
        done = {(r["search"], r["fibers_from"], r.get("cut_pricing", "forward")) for r in rows if r["model"] == name}
        todo = [t for t in todo if t not in done]
        if not todo:
            continue
        model, search, unseen, what = sets(name, args.samples)
        unseen_base = evaluate_loss(model, unseen)
        for how, source, pricing in todo:
            compressed = copy.deepcopy(model)
            config = FibrationConfig(tolerance=args.tolerance, search=how, fibers_from=source, cut_pricing=pricing)
            cpu = time.process_time()
            report = greedy_search(compressed, config, search, progress=False)
            keep_row(rows, {"model": name, "search": how, "fibers_from": source, "cut_pricing": pricing,
                         "cpu_seconds": time.process_time() - cpu, "ratio": report.non_embedding_ratio,
                         "non_embedding_before": report.non_embedding_params_before,
                         "non_embedding_after": report.non_embedding_params_after,
                         "holdout_base": report.holdout_base_loss, "holdout_loss": report.holdout_final_loss,
                         "holdout_se": report.holdout_se, "searches": len(report.attempts),
                         "unseen_base": unseen_base, "unseen_loss": evaluate_loss(compressed, unseen),
                         "unseen_metric": what}, head, rows_file)
    lines = ["# The command's default search and fiber source against the others", "", preamble_markdown(head),
             f"τ = {args.tolerance}, compensated collapse, attention + MLP, held-out check on half of {args.samples} "
             "eval examples (the command's settings); CPU = process CPU seconds of the search and check on one "
             "thread of this shared CPU (each row's load in rows.json); unseen data as named.", "",
             "| model | search | fibers | cut pricing | searches | non-embedding | ratio | held-out (base → after "
             "± se) | unseen (base → after) | CPU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['search']} | {r['fibers_from']} | {r.get('cut_pricing', 'forward')} | "
                     f"{r['searches']} | "
                     f"{r['non_embedding_before']:,} → {r['non_embedding_after']:,} | {r['ratio']:.3f}× | "
                     f"{r['holdout_base']:.4f} → {r['holdout_loss']:.4f} ± {r['holdout_se']:.4f} | "
                     f"{r['unseen_base']:.4f} → {r['unseen_loss']:.4f} | {r['cpu_seconds']:.0f} s |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
