"""The README's main job (`hf-fibration compress`, all-MiniLM-L6-v2 on the packaged eval text) under each search
and fiber source, one after the other in one run, so that their times compare.

    python scripts/bench_main_job.py [--variants default "--search block" "--search block --fibers-from span"]

Each variant is the CLI with its defaults plus the variant's flags, writing to a temporary directory; from its
fibration_report.json: the held-out 1 − cos (the half of the eval lines the search never saw), the non-embedding
ratio, the searches run (attempts), and the wall and process CPU seconds of the whole command. Writes
results/cli_minilm/README.md and rows.json (rows are kept across runs, keyed by variant).
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
import time
from pathlib import Path

import torch

from hf_fibration import cli
from hf_fibration.evaluation.results_io import (
    command_line,
    keep_row,
    preamble_markdown,
    print_preamble,
    read_rows,
)


def run_variant(flags: str, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        argv = ["compress", "--output", str(out), "--no-progress", *shlex.split(flags)]
        if threads:
            torch.set_num_threads(threads)
        wall, cpu = time.perf_counter(), time.process_time()
        code = cli.main(argv)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if code != 0:
            return {"variant": flags, "exit_code": code, "seconds": wall, "cpu_seconds": cpu}
        record = json.loads((out / "fibration_report.json").read_text())
    report = record["report"]
    return {"variant": flags, "exit_code": code, "seconds": wall, "cpu_seconds": cpu,
            "non_embedding_before": report["non_embedding_params_before"],
            "non_embedding_after": report["non_embedding_params_after"],
            "ratio": report["non_embedding_params_before"] / report["non_embedding_params_after"],
            "search_loss": report["final_loss"], "holdout_base": report["holdout_base_loss"],
            "holdout_loss": report["holdout_final_loss"], "holdout_se": report["holdout_se"],
            "searches": len(report["attempts"]), "attempts": report["attempts"],
            "tolerance": record["config"]["tolerance"], "fibers_from": record["config"]["fibers_from"],
            "search": record["config"]["search"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["", "--search block", "--search block --fibers-from span"])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--tag", default="", help="names the code measured (rows are kept per tag and variant)")
    parser.add_argument("--out", default="results/cli_minilm")
    args = parser.parse_args(argv)
    head = print_preamble(command_line(__file__, argv), load=True)
    out = Path(args.out)
    rows_file = out / "rows.json"
    rows = read_rows(rows_file)
    for flags in args.variants:
        if any(r["variant"] == flags and r.get("tag", "") == args.tag for r in rows):
            continue
        keep_row(rows, {**run_variant(flags, args.threads), "tag": args.tag}, head, rows_file)
    base = rows[0] if rows else None
    lines = ["# `hf-fibration compress` on all-MiniLM-L6-v2 (the README's main command)", "", preamble_markdown(head),
             "Defaults otherwise: the packaged wikitext-2 eval text (256 lines: 128 search, 128 held out), τ = 0.01 "
             "on 1 − cos of the sentence embeddings (absolute), attention + MLP. Held-out = the 128 lines the search "
             "and refits never saw. CPU = process CPU seconds of the whole command (load, search, check, save); the "
             "machine was shared, so wall seconds vary with the load (rows.json has each row's). CPU vs first: the "
             "first row's CPU seconds over this row's — within one machine only: the rows from 2026-12-07 09:00 UTC "
             "on ran on a machine about 2× faster than the earlier ones (the 135M command at one code: 206 vs 392 s "
             "wall, results/bench_llm_cli).", "",
             "| code | date | flags | searches | non-embedding | ratio | held-out 1 − cos (± se) | wall | CPU "
             "| CPU vs first |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["exit_code"] != 0:
            lines.append(f"| {r.get('tag', '')} | {r['date']} | `{r['variant'] or '(default)'}` | "
                         f"exit {r['exit_code']} | | | | "
                         f"{r['seconds']:.0f} s | {r['cpu_seconds']:.0f} s | |")
            continue
        same_machine = r["date"] < "2026-12-07 09:00"  # the first row's machine
        speed = f"{base['cpu_seconds'] / r['cpu_seconds']:.1f}×" if base and base["exit_code"] == 0 and same_machine \
            else "–"
        lines.append(f"| {r.get('tag', '')} | {r['date']} | `{r['variant'] or '(default)'}` | {r['searches']} | "
                     f"{r['non_embedding_before']:,} → "
                     f"{r['non_embedding_after']:,} | {r['ratio']:.3f}× | {r['holdout_loss']:.4f} (± "
                     f"{r['holdout_se']:.4f}) | {r['seconds']:.0f} s | {r['cpu_seconds']:.0f} s | {speed} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
