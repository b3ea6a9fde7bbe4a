"""Scaling laws before and after fibration: train a series of model sizes, compress each with the same τ, fit
L = L0·P^−α (P = non-embedding parameters) to both, with 95% confidence intervals, and plot them log-log.

    python scripts/scaling_law.py [--sizes 32 48 64 96 128 192 --steps 800 --tolerance 0.01 --runs runs/scaling]

Models: GPT-2 architecture, --layers blocks, d_model from --sizes, trained by scripts/train_lm.py on tinyshakespeare
(finished sizes are reused; an interrupted one resumes from its checkpoint). Compression: the greedy ε search on the
first --search-blocks validation blocks; losses are reported on the other validation blocks. --retune-steps > 0
retunes each compressed model on the training blocks (the compress–retune setting of the seed's law).
Writes results.md, fit.json and scaling_law.png to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import train_lm  # a sibling script (scripts/ is on the path when this one runs): its main trains each size
import transformers as T

from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.evaluation.evalset import EvalSet, evaluate_loss
from hf_fibration.evaluation.results_io import command_line, preamble_markdown, print_preamble, write_json
from hf_fibration.models.surgery import non_embedding_parameters
from hf_fibration.research.causal_lm import SHAKESPEARE, blocks, split_text
from hf_fibration.research.scaling import fit_power_law
from hf_fibration.training.retune import retune


def split_blocks(evalset: EvalSet, first: int) -> tuple[EvalSet, EvalSet]:
    """The first ``first`` batches and the rest, as two eval sets."""
    head = EvalSet(evalset.task, evalset.batches[:first], evalset.weights[:first])
    tail = EvalSet(evalset.task, evalset.batches[first:], evalset.weights[first:])
    return head, tail


def train_size(d_model: int, args, runs: Path) -> Path:
    out = runs / f"gpt2-d{d_model}"
    if not (out / "results.json").exists():
        heads = max(1, d_model // 32)
        train_lm.main(["--data", args.data, "--out", str(out), "--d-model", str(d_model), "--layers",
                       str(args.layers), "--heads", str(heads), "--steps", str(args.steps), "--eval-every",
                       str(args.eval_every), "--vocab", str(args.vocab), "--batch-size", str(args.batch_size),
                       "--block", str(args.block)]
                      + (["--resume"] if (out / "retune_state").exists() else [])
                      + (["--no-progress"] if args.no_progress else []))
    return out


def compress_size(model_dir: Path, args) -> dict:
    record = model_dir / f"compressed-tau{args.tolerance}-retune{args.retune_steps}.json"
    if record.exists():
        return json.loads(record.read_text())
    tok = T.AutoTokenizer.from_pretrained(model_dir)
    model = T.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    train_text, val_text = split_text(Path(args.data))
    val = blocks(tok, val_text, args.block, 16)
    search, report_set = split_blocks(val, args.search_blocks // 16)
    before = {"non_embedding": non_embedding_parameters(model), "loss": evaluate_loss(model, report_set)}
    start = time.perf_counter()
    config = FibrationConfig(tolerance=args.tolerance, search_steps=args.search_steps)
    compress_pretrained(model, config, evalset=search, progress=not args.no_progress)
    if args.retune_steps:
        train = blocks(tok, train_text, args.block, args.batch_size)
        retune(model, train, search, epochs=1, max_steps=args.retune_steps, learning_rate=args.retune_lr,
               patience=10**9, eval_every=max(1, args.retune_steps // 4), progress=not args.no_progress)
    result = {"d_model": model.config.n_embd, "before": before,
              "after": {"non_embedding": non_embedding_parameters(model), "loss": evaluate_loss(model, report_set)},
              "seconds": round(time.perf_counter() - start, 1)}
    record.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHAKESPEARE))
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64, 96, 128, 192])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--search-steps", type=int, default=6)
    parser.add_argument("--search-blocks", type=int, default=64)
    parser.add_argument("--retune-steps", type=int, default=0)
    parser.add_argument("--retune-lr", type=float, default=3e-4)
    parser.add_argument("--runs", default="runs/scaling")
    parser.add_argument("--out", default="results/scaling_law")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if len(args.sizes) < 3:
        raise SystemExit("A power-law fit with confidence intervals needs at least 3 sizes; pass more --sizes.")
    head = print_preamble(command_line(__file__, argv))
    runs, out = Path(args.runs), Path(args.out)
    rows = []
    for d in args.sizes:
        rows.append(compress_size(train_size(d, args, runs), args))
        r = rows[-1]
        print(f"d_model {d}: {r['before']['non_embedding']:,} → {r['after']['non_embedding']:,} non-embedding, "
              f"loss {r['before']['loss']:.4f} → {r['after']['loss']:.4f}", flush=True)
    fits = {name: fit_power_law([r[name]["non_embedding"] for r in rows], [r[name]["loss"] for r in rows])
            for name in ("before", "after")}
    write_json(out / "fit.json", head, rows=rows, fits=fits)
    write_markdown(rows, fits, out, head, args)
    plot(rows, fits, out / "scaling_law.png", args.tolerance)
    return {"rows": rows, "fits": fits}


def write_markdown(rows: list[dict], fits: dict, out: Path, head: dict[str, str], args) -> None:
    span = max(r["before"]["non_embedding"] for r in rows) / min(r["before"]["non_embedding"] for r in rows)
    lines = [
        "# Scaling laws before and after fibration", "",
        *preamble_markdown(head).splitlines(),
        f"- models: GPT-2 architecture, {args.layers} blocks, FFN 4·d, trained {args.steps} steps (batch "
        f"{args.batch_size} × {args.block} tokens, best val checkpoint) on tinyshakespeare with a {args.vocab}-token "
        f"BPE; {len(rows)} sizes spanning {span:.1f}× in non-embedding parameters",
        f"- compression: greedy ε search, τ = {args.tolerance}, on the first {args.search_blocks} validation blocks"
        + (f", then {args.retune_steps} retuning steps" if args.retune_steps else ", no retuning")
        + "; losses on the remaining validation blocks", "",
        "| d_model | non-embedding | val loss | compressed non-emb. | ratio | compressed loss | Δ loss | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, a = r["before"], r["after"]
        lines.append(f"| {r['d_model']} | {b['non_embedding']:,} | {b['loss']:.4f} | {a['non_embedding']:,} | "
                     f"{b['non_embedding'] / a['non_embedding']:.2f}× | {a['loss']:.4f} | "
                     f"{100 * (a['loss'] / b['loss'] - 1):+.2f}% | {r['seconds']:.0f} |")
    lines += ["", "Fit L = L0·P^−α (least squares in log-log space, 95% t intervals):", "",
              "| models | α | α 95% CI | L0 | L0 95% CI | R² |", "|---|---|---|---|---|---|"]
    for name, label in (("before", "uncompressed"), ("after", f"fibration τ={args.tolerance}")):
        f = fits[name]
        lines.append(f"| {label} | {f['alpha']:.4f} | [{f['alpha_ci'][0]:.4f}, {f['alpha_ci'][1]:.4f}] | "
                     f"{f['L0']:.3f} | [{f['L0_ci'][0]:.3f}, {f['L0_ci'][1]:.3f}] | {f['r2']:.3f} |")
    lines += ["", "Seed (Multi30k Marian series, compress–retune): α 0.028 → 0.049, L0 3.0 → 3.8.", "",
              "![scaling law](scaling_law.png)"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def plot(rows: list[dict], fits: dict, path: Path, tolerance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, label, color in (("before", "uncompressed", "C0"), ("after", f"fibration τ={tolerance}", "C3")):
        p = [r[name]["non_embedding"] for r in rows]
        loss = [r[name]["loss"] for r in rows]
        f = fits[name]
        grid = [min(p) * (max(p) / min(p)) ** (i / 50) for i in range(51)]
        ax.loglog(p, loss, "o", color=color, label=f"{label}: α={f['alpha']:.3f}, L0={f['L0']:.2f}")
        ax.loglog(grid, [f["L0"] * g ** -f["alpha"] for g in grid], "-", color=color, alpha=0.7)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
