"""The paper's MLP experiment, offline: an MLP on sklearn's digits, compressed across ε by fibration and
compared at equal unit counts with random and L2-norm unit selection (same collapse path).

    python scripts/mlp_digits.py [--hidden 256 --epochs 60 --out results/mlp_digits]

Writes results.md (table, command, machine, date) and accuracy_vs_params.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hf_fibration.core import FiberDendrogram, colored_in_weights, compress_sequential, count_parameters
from hf_fibration.core.selection import selection_partitioner
from hf_fibration.evaluation.results_io import preamble_markdown, print_preamble
from hf_fibration.research.digits import accuracy, digits_mlp, digits_split, train_epochs


def train(hidden: int, epochs: int, seed: int, x: torch.Tensor, y: torch.Tensor) -> nn.Sequential:
    torch.manual_seed(seed)
    model = digits_mlp(hidden)
    train_epochs(model, x, y, epochs)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-seeds", type=int, default=5)
    parser.add_argument("--scale-aware", action="store_true", help="merge positive multiples (ReLU-exact)")
    parser.add_argument("--out", default="results/mlp_digits")
    args = parser.parse_args()
    head = print_preamble()

    x_tr, y_tr, x_te, y_te = digits_split(args.seed)
    model = train(args.hidden, args.epochs, args.seed, x_tr, y_tr)
    base_acc, base_params = accuracy(model, x_te, y_te), count_parameters(model)
    print(f"trained MLP 64-{args.hidden}-{args.hidden}-10: test accuracy {base_acc:.4f}, {base_params} parameters")

    rows = []
    for eps in [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]:
        fib, report = compress_sequential(model, eps, scale_aware=args.scale_aware)
        counts = {r.name: r.units_after for r in report.layers[:-1]}
        frac = report.params_after / base_params
        row = {"eps": eps, "units": "/".join(str(c) for c in counts.values()), "params": frac,
               "fibration": accuracy(fib, x_te, y_te)}
        for crit, seeds in (("random", args.random_seeds), ("l2", 1)):
            accs = [accuracy(compress_sequential(model, partitioner=selection_partitioner(crit, counts, s))[0],
                             x_te, y_te) for s in range(seeds)]
            row[crit] = float(np.mean(accs))
        rows.append(row)
        print(f"eps {eps:.2f} units {row['units']:>9} params {frac:6.1%}  fibration {row['fibration']:.4f}  "
              f"random {row['random']:.4f}  L2 {row['l2']:.4f}")

    first = FiberDendrogram(colored_in_weights(model[0].weight, model[0].bias))
    exact = first.cut(0.0).num_fibers
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# MLP on sklearn digits: fibration vs random and L2 unit selection at equal unit counts", "",
        *preamble_markdown(head).splitlines(),
        f"- model: MLP 64-{args.hidden}-{args.hidden}-10, ReLU, Adam 1e-3, {args.epochs} epochs; "
        f"test accuracy {base_acc:.4f}; {base_params} parameters; exact (ε=0) fibers in layer 0: {exact}",
        f"- random: mean of {args.random_seeds} seeds; no retuning after compression", "",
        "| ε | units (hidden layers) | params kept | fibration acc | random acc | L2 acc |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['eps']:.2f} | {r['units']} | {r['params']:.1%} | {r['fibration']:.4f} | {r['random']:.4f} | "
              f"{r['l2']:.4f} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, base_acc, out / "accuracy_vs_params.png")
    print(f"wrote {out / 'results.md'} and {out / 'accuracy_vs_params.png'}")


def plot(rows: list[dict], base_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    params = [r["params"] for r in rows]
    for key, label, color in (("fibration", "fibration", "tab:red"), ("random", "random", "tab:blue"),
                              ("l2", "L2 norm", "tab:pink")):
        ax.plot(params, [r[key] for r in rows], "o-", label=label, color=color)
    ax.axhline(base_acc, color="gray", ls="--", lw=1, label="uncompressed")
    ax.set_xlabel("parameter fraction kept")
    ax.set_ylabel("test accuracy")
    ax.set_title("MLP on digits, equal unit counts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
