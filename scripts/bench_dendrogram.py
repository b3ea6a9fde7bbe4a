"""Time the coloring + dendrogram of one 4096×1024 layer (target: under a second on a 2-core CPU).

    python scripts/bench_dendrogram.py [--rows 4096 --cols 1024 --repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_fibration.core import FiberDendrogram, colored_in_weights
from hf_fibration.evaluation.results_io import print_preamble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--linkage", default="complete")
    args = parser.parse_args()
    print_preamble()
    torch.manual_seed(0)
    weight, bias = torch.randn(args.rows, args.cols), torch.randn(args.rows)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        dendro = FiberDendrogram(colored_in_weights(weight, bias), args.linkage)
        built = time.perf_counter()
        cuts = [dendro.cut(eps).num_fibers for eps in (0.0, 0.5, 0.9, 1.0)]
        done = time.perf_counter()
        times.append((built - start, done - built))
    build = min(t[0] for t in times)
    cut = min(t[1] for t in times)
    print(f"{args.rows}x{args.cols} ({args.linkage}): coloring + dendrogram {build:.3f} s (best of {args.repeats}); "
          f"4 cuts {cut * 1000:.1f} ms; fibers at eps 0/0.5/0.9/1.0: {cuts}")


if __name__ == "__main__":
    main()
