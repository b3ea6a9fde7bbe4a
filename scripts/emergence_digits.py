"""Emergence of fibers, opfibers and covers while an MLP learns sklearn's digits (seed §3.1, CPU-sized).

    python scripts/emergence_digits.py [--hidden 128 --steps 4000 --every 100 --out results/emergence]

Trains a 64-h-h-10 MLP with plain minibatch SGD, measuring with ``SymmetryLogger`` every N steps at a few ε
(the seed's precision: colored weights equal within ε in every coordinate). Also counts how many ε-covers split
between two measurements (Theorem 2.1 forbids it for exact covers under full-batch GD; SGD and ε > 0 are
outside the theorem). Writes results.md, history.json and emergence.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from hf_fibration.evaluation.results_io import preamble, preamble_markdown, write_json
from hf_fibration.research.digits import accuracy, digits_mlp, digits_split, random_batch_steps
from hf_fibration.research.emergence import SymmetryLogger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--epsilons", default="0,0.2,0.3,0.5")
    parser.add_argument("--activation", default="relu", choices=("relu", "tanh"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/emergence")
    args = parser.parse_args()
    eps = tuple(float(e) for e in args.epsilons.split(","))
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = digits_split(args.seed)
    model = digits_mlp(args.hidden, activation=nn.ReLU if args.activation == "relu" else nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    logger = SymmetryLogger(eps, args.every)
    acc = []
    gen = torch.Generator().manual_seed(args.seed)
    for step in random_batch_steps(model, opt, x_tr, y_tr, args.steps, args.batch, gen):
        if logger(model, step) is not None:
            acc.append(accuracy(model, x_te, y_te))
            print(f"step {step:5d} test acc {acc[-1]:.3f} "
                  + " ".join(f"ε={e:g}: fib {logger.history[-1][f'symmetry/fibers@{e:g}']:.0f} "
                             f"cov {logger.history[-1][f'symmetry/covers@{e:g}']:.0f}" for e in eps), flush=True)
    for h, a in zip(logger.history, acc, strict=True):
        h["test_accuracy"] = a
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = preamble()
    write_json(out / "history.json", meta, args=vars(args), history=logger.history)
    plot(logger.history, eps, args, out / "emergence.png")
    write_md(logger.history, eps, args, meta, out / "results.md")


def plot(history: list[dict], eps: tuple[float, ...], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    units = 2 * args.hidden
    fig, axes = plt.subplots(1, len(eps) + 1, figsize=(3.6 * (len(eps) + 1), 3.4))
    for ax, e in zip(axes, eps, strict=False):
        for kind, color in (("fibers", "tab:red"), ("opfibers", "tab:green"), ("covers", "tab:purple")):
            ax.plot(steps, [h[f"symmetry/{kind}@{e:g}"] / units for h in history], label=kind, color=color)
        ax.set_title(f"ε = {e:g}")
        ax.set_xlabel("SGD step")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("classes / hidden units")
    axes[0].legend()
    axes[-1].plot(steps, [h["test_accuracy"] for h in history], color="k")
    axes[-1].set_title("test accuracy")
    axes[-1].set_xlabel("SGD step")
    fig.suptitle(f"Digits MLP 64-{args.hidden}-{args.hidden}-10 ({args.activation}), SGD lr {args.lr}, "
                 f"weight decay {args.weight_decay:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_md(history: list[dict], eps: tuple[float, ...], args: argparse.Namespace, meta: dict, path: Path) -> None:
    units = 2 * args.hidden
    lines = [
        "# Emergence of fibers, opfibers and covers: MLP on sklearn digits", "",
        *preamble_markdown(meta).splitlines(),
        f"- model: 64-{args.hidden}-{args.hidden}-10 {args.activation}, plain SGD lr {args.lr}, weight decay "
        f"{args.weight_decay:g}, batch {args.batch}, "
        f"{args.steps} steps; measured every {args.every} steps with "
        "`hf_fibration.research.emergence.SymmetryLogger`; "
        "test accuracy on the 30% split never trained on",
        "- ε: colored in-/out-weights equal within ε in every coordinate (seed §3.2), complete linkage; "
        "ε = 0 is equality up to float32 rounding", "",
        "![emergence](emergence.png)", "",
        "| step | test acc | " + " | ".join(f"fibers / opfibers / covers @ε={e:g}" for e in eps) + " |",
        "|---|---|" + "---|" * len(eps),
    ]
    picks = sorted({0, len(history) // 8, len(history) // 4, len(history) // 2, len(history) - 1})
    for i in picks:
        h = history[i]
        lines.append(f"| {h['step']} | {h['test_accuracy']:.3f} | " + " | ".join(
            f"{h[f'symmetry/fibers@{e:g}']:.0f} / {h[f'symmetry/opfibers@{e:g}']:.0f} / "
            f"{h[f'symmetry/covers@{e:g}']:.0f}" for e in eps) + " |")
    lines += ["", f"Out of {units} hidden units. Cover splits between consecutive measurements under SGD (total over "
              "the run; a split is a cover of the earlier measurement spread over several later ones):", ""]
    for e in eps:
        total = sum(h.get(f"symmetry/cover_splits@{e:g}", 0.0) for h in history)
        nontrivial = sum(1 for h in history[:-1] if h[f"symmetry/covers@{e:g}"] < units)
        lines.append(f"- ε = {e:g}: {total:.0f} splits over {len(history) - 1} intervals "
                     f"({nontrivial} measurements had a non-trivial cover to split)")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
