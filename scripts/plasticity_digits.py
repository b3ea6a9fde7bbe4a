"""Continual binary digit tasks: plain SGD vs periodic fibration symmetry breaking (seed §3.4, CPU-sized).

    python scripts/plasticity_digits.py [--tasks 60 --steps 300 --epsilon 0.3 --seeds 3 --out results/plasticity]

Each task is a random pair of digit classes (random which one is label 1), learned by one MLP (64-h-h-2, ReLU,
one shared head, nothing reset) with plain SGD; the seed's continual-ImageNet protocol in miniature. The
"break" run calls ``hf_fibration.break_symmetry(model, ε)`` before every ``--every``-th task: covers at ε are
collapsed and the freed units re-randomized with zero outgoing weights. Accuracy is measured on the task's
held-out test digits (never trained on) after the task's training. Writes results.md, results.json,
plasticity.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from hf_fibration.core.breaking import break_symmetry
from hf_fibration.evaluation.results_io import preamble, preamble_markdown, write_json
from hf_fibration.research.digits import accuracy, digits_mlp, digits_split, random_batch_steps


def tasks(n: int, seed: int) -> list[tuple[int, int]]:
    gen = np.random.default_rng(seed)
    return [tuple(int(c) for c in gen.choice(10, 2, replace=False)) for _ in range(n)]


def run(method: str, seed: int, args: argparse.Namespace, splits: tuple[torch.Tensor, ...]) -> dict:
    x_tr, y_tr, x_te, y_te = splits
    torch.manual_seed(seed)
    model = digits_mlp(args.hidden, classes=2)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(seed)
    task_gen = torch.Generator().manual_seed(1000 + seed)  # same task sequence for both methods
    acc, early, freed = [], [], []
    for t, (a, b) in enumerate(tasks(args.tasks, seed)):
        if method == "break" and t > 0 and t % args.every == 0:
            freed.append(break_symmetry(model, args.epsilon, generator=gen).total_freed)
        tr = (y_tr == a) | (y_tr == b)
        te = (y_te == a) | (y_te == b)
        perm = torch.randperm(64, generator=task_gen) if args.permute else torch.arange(64)
        xt, yt = x_tr[tr][:, perm], (y_tr[tr] == b).long()
        xe, ye = x_te[te][:, perm], (y_te[te] == b).long()
        for done in random_batch_steps(model, opt, xt, yt, args.steps, args.batch, gen):
            if 0 < done == args.early:
                early.append(accuracy(model, xe, ye))
        acc.append(accuracy(model, xe, ye))
        if (t + 1) % 25 == 0:
            print(f"{method} seed {seed} task {t + 1}: accuracy {np.mean(acc[-25:]):.4f}", flush=True)
    return {"accuracy": acc, "early_accuracy": early, "freed": freed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--early", type=int, default=30, help="also record accuracy after this many steps")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epsilon", type=float, default=0.3)
    parser.add_argument("--every", type=int, default=1, help="break before every N-th task")
    parser.add_argument("--permute", action="store_true",
                        help="each task also permutes the 64 pixels afresh (features stop transferring)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="results/plasticity")
    parser.add_argument("--replot", action="store_true", help="redraw results.md and the plot from results.json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.replot:
        saved = json.loads((out / "results.json").read_text())
        meta, results = {k: saved[k] for k in ("command", "machine", "date")}, saved["results"]
        args = argparse.Namespace(**{"permute": False, **saved["args"], "out": args.out})
    else:
        torch.set_num_threads(1)  # a 64-h-h-2 MLP: one thread is fastest, and the CPU is shared
        splits = digits_split(0)
        results = {m: [run(m, s, args, splits) for s in range(args.seeds)] for m in ("sgd", "break")}
        meta = preamble()
        write_json(out / "results.json", meta, args=vars(args), results=results)
    plot(results, args, out / "plasticity.png")
    write_md(results, args, meta, out / "results.md")
    print((out / "results.md").read_text())


def curves(results: dict, key: str) -> dict[str, np.ndarray]:
    return {m: np.array([r[key] for r in runs]) for m, runs in results.items()}


def smooth(c: np.ndarray, window: int) -> np.ndarray:
    """Moving average over tasks (per seed), 'valid' part only."""
    kernel = np.ones(window) / window
    return np.array([np.convolve(row, kernel, mode="valid") for row in c])


def plot(results: dict, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "accuracy", f"after {args.steps} steps"),
                           (axes[1], "early_accuracy", f"after {args.early} steps")):
        window = max(1, args.tasks // 30)
        for m, color in (("sgd", "tab:blue"), ("break", "tab:red")):
            c = smooth(curves(results, key)[m], window)
            x = np.arange(len(c[0])) + (window + 1) / 2
            ax.plot(x, c.mean(0), color=color,
                    label="plain SGD" if m == "sgd" else f"symmetry breaking (ε={args.epsilon:g})")
            ax.fill_between(x, c.min(0), c.max(0), color=color, alpha=0.15)
        ax.set_title(f"held-out accuracy, {title} ({window}-task average)", fontsize=10)
        ax.set_xlabel("task")
    axes[0].set_ylabel(f"accuracy (mean, min–max of {args.seeds} seeds)")
    fig.suptitle(f"{args.tasks} binary digit tasks{' (permuted pixels)' if args.permute else ''}, SGD lr {args.lr}")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_md(results: dict, args: argparse.Namespace, meta: dict, path: Path) -> None:
    acc, early = curves(results, "accuracy"), curves(results, "early_accuracy")
    third = max(args.tasks // 3, 1)
    freed = [f for r in results["break"] for f in r["freed"]]
    lines = [
        "# Symmetry breaking for plasticity: continual binary digit tasks", "",
        *preamble_markdown(meta).splitlines(),
        f"- {args.tasks} tasks, each a random pair of digit classes"
        f"{' with a fresh random permutation of the 64 pixels' if args.permute else ''}; "
        f"MLP 64-{args.hidden}-{args.hidden}-2 ReLU, "
        f"plain SGD lr {args.lr}, batch {args.batch}, {args.steps} steps per task, one shared head; "
        f"{args.seeds} seeds; accuracy on the pair's held-out test digits (sklearn digits, 30% split)",
        f"- break: `hf_fibration.break_symmetry(model, {args.epsilon:g})` before every {args.every}. task; "
        f"units freed per break: mean {np.mean(freed) if freed else 0:.1f} of {2 * args.hidden}", "",
        "![plasticity](plasticity.png)", "",
        "| method | first third of tasks (after training) | last third (after training) | first third (early) | "
        "last third (early) |", "|---|---|---|---|---|",
    ]
    cell = lambda c: f"{c.mean():.4f} ± {c.mean(1).std(ddof=1) if len(c) > 1 else 0:.4f}"  # noqa: E731
    for m in ("sgd", "break"):
        lines.append(f"| {m} | {cell(acc[m][:, :third])} | {cell(acc[m][:, -third:])} | "
                     f"{cell(early[m][:, :third])} | {cell(early[m][:, -third:])} |")
    lines += ["", f"(mean over tasks and seeds ± standard deviation of the {args.seeds} per-seed means)"]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
