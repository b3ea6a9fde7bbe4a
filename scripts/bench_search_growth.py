"""The growth curve of the τ search: the block search (linear in depth, the command's default) against the greedy
search (the seed's Alg. 3), in one run, over a family of Llama causal LMs trained here at several depths and widths,
plus all-MiniLM-L6-v2.

    python scripts/train_lm.py --arch llama --d-model 128 --layers 4 --out runs/growth/llama-d128-l4   # each model
    python scripts/bench_search_growth.py [--models runs/growth/llama-d128-l2 ... minilm] [--searches block greedy]

Each search is what `hf-fibration compress DIR --tolerance 0.01` runs by default (span fibers, compensated refits,
local cut pricing, the held-out check on) with only ``--search`` changed. For a trained LM (scripts/train_lm.py on
tinyshakespeare) the search examples are the first 64 blocks of 128 tokens of the validation text, the held-out
check's the next 64, and the unseen loss is measured on every block after those (the training script chose its best
checkpoint on the first 256 validation blocks; the compression never reads the unseen ones). For all-MiniLM-L6-v2:
the command's own eval data (the packaged 256 wikitext-2 valid lines, a seeded half held out), unseen = 1 − cos on
256 wikitext-2 test lines. Time is the
process CPU seconds of the search on one thread. The exponent of CPU time against non-embedding parameters is fitted
per search over the LMs. Rows are kept across runs (a rerun skips rows already in rows.json, so train a new size and
rerun); README.md, rows.json and growth.png go to results/bench_search_growth/.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import matplotlib
import torch
import transformers as T
from bench_block_search import WIKITEXT, sets
from datasets import Dataset

import hf_fibration  # noqa: F401
from hf_fibration import FibrationConfig
from hf_fibration.config import COMMAND_DEFAULTS, loss_bound
from hf_fibration.evaluation.evalset import EvalSet, build_eval_set, evaluate_loss
from hf_fibration.evaluation.results_io import (
    command_line,
    keep_row,
    preamble_markdown,
    print_preamble,
    read_rows,
)
from hf_fibration.models.surgery import non_embedding_parameters
from hf_fibration.policies.search import greedy_search
from hf_fibration.research.causal_lm import SHAKESPEARE, blocks, split_text
from hf_fibration.research.scaling import fit_power_law

matplotlib.use("Agg")


def _take(evalset: EvalSet, start: int, stop: int | None) -> EvalSet:
    """Batches ``start:stop`` of ``evalset`` (whole batches)."""
    return EvalSet(evalset.task, evalset.batches[start:stop], evalset.weights[start:stop])


def data(name: str, text: Path = SHAKESPEARE, block: int = 128, examples: int = 64
         ) -> tuple[torch.nn.Module, EvalSet, EvalSet, EvalSet, str, dict[str, EvalSet]]:
    """(model, search examples, held-out examples, unseen examples, what the unseen loss is, other unseen sets): for
    an LM, ``examples`` search blocks of ``block`` tokens, as many held out, from the validation part of ``text``;
    for all-MiniLM-L6-v2 also the first 256 wikitext-2 test lines as they come (headings and short lines too)."""
    if name == "minilm":  # the command's own eval data: the packaged 256 paragraphs, half held out
        model, _, lines, _ = sets("minilm", 64)  # its search set (valid lines) is not used here
        tokenizer = T.AutoTokenizer.from_pretrained(model.name_or_path)
        packaged = build_eval_set(model, tokenizer, None, batch_size=16, max_length=128, max_samples=256)
        search, holdout = packaged.split(0.5, seed=0)
        # unseen text of the same kind: wikitext-2 *test* paragraphs (no headings, ≥ 20 words), as packaged
        text = [line.strip() for line in (WIKITEXT / "test.txt").read_text(encoding="utf-8").splitlines()]
        paragraphs = Dataset.from_dict({"text": [t for t in text if len(t.split()) >= 20 and not t.startswith("=")]
                                        [:256]})
        unseen = build_eval_set(model, tokenizer, paragraphs, batch_size=16, max_length=128, max_samples=256)
        return (model, search, holdout, unseen, f"1 − cos on {unseen.num_examples} wikitext-2 test paragraphs",
                {"unseen_lines": lines})
    extra = {}
    model = T.AutoModelForCausalLM.from_pretrained(name).eval()
    tokenizer = T.AutoTokenizer.from_pretrained(name)
    batch = 16  # the command's --batch-size
    windows = blocks(tokenizer, split_text(Path(text))[1], block, batch)
    first, second = max(examples // batch, 1), 2 * max(examples // batch, 1)
    unseen = _take(windows, second, None)
    if not unseen.batches:
        raise ValueError(f"{name}: the validation text holds no blocks beyond the search and held-out ones.")
    return (model, _take(windows, 0, first), _take(windows, first, second), unseen,
            f"loss on the {unseen.num_examples} validation blocks after the search and held-out ones", extra)


def run(name: str, search: str, tolerance: float, **sizes) -> dict:
    model, examples, holdout, unseen, what, extra = data(name, **sizes)
    compressed = copy.deepcopy(model)
    config = FibrationConfig(**{**COMMAND_DEFAULTS, "search": search}, tolerance=tolerance)
    wall, cpu = time.perf_counter(), time.process_time()
    report = greedy_search(compressed, config, examples, progress=False, holdout=holdout)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    base = report.holdout_base_loss
    return {"model": name, "search": search, "layers": getattr(model.config, "num_hidden_layers", None),
            "d_model": getattr(model.config, "hidden_size", None), "cpu_seconds": cpu, "wall_seconds": wall,
            "non_embedding_before": non_embedding_parameters(model), "non_embedding_after":
            non_embedding_parameters(compressed), "ratio": report.non_embedding_ratio, "holdout_base": base,
            "holdout_loss": report.holdout_final_loss, "holdout_bound": loss_bound(base, tolerance, holdout.task),
            "searches": len(report.attempts or [1]), "unseen_base": evaluate_loss(model, unseen),
            "unseen_loss": evaluate_loss(compressed, unseen), "unseen_is": what,
            **{f"{key}_base": evaluate_loss(model, other) for key, other in extra.items()},
            **{f"{key}_loss": evaluate_loss(compressed, other) for key, other in extra.items()}}


def _short(name: str) -> str:
    return Path(name).name


def render(rows: list[dict], head: dict, out: Path, tolerance: float) -> None:
    lines = ["# The τ search's growth curve: block search vs greedy search", "", preamble_markdown(head),
             f"τ = {tolerance}, every other option the command's default (span fibers, compensated refits, local cut "
             "pricing, held-out check on); CPU = process seconds of the search (one thread). Held-out: the check's "
             "own examples, never used to choose; unseen: as named per model. Rows may come from several invocations "
             "(a model trained later is added to the table); each row's machine, date and load are in rows.json, "
             "and a model's two searches always ran in one invocation.", "",
             "| model | layers | d | search | non-embedding | ratio | vs greedy | held-out (base → after, bound) | "
             "unseen (base → after) | CPU | searches |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    greedy = {r["model"]: r for r in rows if r["search"] == "greedy"}
    for r in sorted(rows, key=lambda r: (r["non_embedding_before"], r["search"])):
        other = greedy.get(r["model"])
        versus = "–" if other is None or r["search"] == "greedy" else f"{r['ratio'] / other['ratio']:.1%}"
        within = "✓" if r["holdout_loss"] <= r["holdout_bound"] + 1e-12 else "✗"
        lines.append(f"| {_short(r['model'])} | {r['layers']} | {r['d_model']} | {r['search']} | "
                     f"{r['non_embedding_before']:,} → {r['non_embedding_after']:,} | {r['ratio']:.3f}× | {versus} | "
                     f"{r['holdout_base']:.4f} → {r['holdout_loss']:.4f} ≤ {r['holdout_bound']:.4f} {within} | "
                     f"{r['unseen_base']:.4f} → {r['unseen_loss']:.4f} | {r['cpu_seconds']:.0f} s | "
                     f"{r['searches']} |")
    lines.append("")
    for r in rows:
        if "unseen_lines_loss" in r:
            lines.append(f"- {_short(r['model'])}, {r['search']} search: on the first 256 lines of wikitext-2 "
                         "test as they come (blank ones dropped; headings and short lines kept, unlike the packaged "
                         f"paragraphs the search and its check read): {r['unseen_lines_base']:.4f} → "
                         f"{r['unseen_lines_loss']:.4f}")
    lines += ["", "## Growth", ""]
    fig, ax = matplotlib.pyplot.subplots(figsize=(6, 4))
    for search, marker in (("block", "o"), ("greedy", "s")):
        family = [r for r in rows if r["search"] == search and r["model"] != "minilm"]
        if len(family) >= 3:
            fit = fit_power_law([r["non_embedding_before"] for r in family], [r["cpu_seconds"] for r in family])
            low, high = (-a for a in reversed(fit["alpha_ci"]))  # the law's α is minus the growth exponent
            lines.append(f"- {search}: CPU time ∝ non-embedding parameters^{-fit['alpha']:.2f} (95% CI "
                         f"[{low:.2f}, {high:.2f}]) over {len(family)} trained LMs")
        mine = [r for r in rows if r["search"] == search]
        ax.loglog([r["non_embedding_before"] for r in mine], [r["cpu_seconds"] for r in mine], marker,
                  label=f"{search} search", alpha=0.8)
        for r in mine:
            if r["model"] == "minilm":
                ax.annotate("all-MiniLM-L6-v2", (r["non_embedding_before"], r["cpu_seconds"]), fontsize=7,
                            xytext=(-70, 6), textcoords="offset points")
    ax.set_xlabel("non-embedding parameters (Llama LMs trained here, and all-MiniLM-L6-v2)")
    ax.set_ylabel("search CPU seconds (one thread)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "growth.png", dpi=120)
    lines += ["", "![growth](growth.png)", ""]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=sorted(str(p) for p in Path("runs/growth").glob("llama-*")
                                                              if (p / "config.json").exists()) + ["minilm"])
    parser.add_argument("--searches", nargs="+", default=["block", "greedy"])
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--out", default="results/bench_search_growth")
    parser.add_argument("--data", default=str(SHAKESPEARE), help="the LMs' text (its validation part is read)")
    parser.add_argument("--block", type=int, default=128, help="tokens per LM example")
    parser.add_argument("--examples", type=int, default=64, help="LM search examples (as many held out)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    head = print_preamble(command_line(__file__, argv), load=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(out / "rows.json")
    for name in args.models:
        for search in args.searches:
            if any(r["model"] == name and r["search"] == search for r in rows):
                continue
            keep_row(rows, run(name, search, args.tolerance, text=Path(args.data), block=args.block,
                               examples=args.examples), head, out / "rows.json")
    render(rows, head, out, args.tolerance)
    return rows


if __name__ == "__main__":
    main()
