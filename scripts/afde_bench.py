"""AFDE against fibration and pruning on small tanh regression MLPs, at equal hidden-unit counts.

    python scripts/afde_bench.py [--datasets lorenz friedman1 diabetes --seeds 5 --out results/afde]

A tanh MLP d_in-64-64-d_out is trained per dataset and seed; then both hidden layers are reduced, one after the
other (the second on the already reduced network), to the same number of units k by:

- ``afde``: ε-FDE blocks (hf_fibration/core/afde.py) with the path metric of the training inputs, sum aggregation;
- ``afde-nodata``: the same with the data-free metric (unit-variance inputs);
- ``fibration``: the paper's fibers (cosine of colored in-weights, complete linkage), mean rows, summed columns;
- ``inout``: cosine of in-rows beside consumer columns (the covers view), same collapse;
- ``magnitude``: keep the k units with the largest L2 norm of their in-weights;
- ``wanda``: keep the k units with the largest Σ_k |V_kj|·‖h_j‖ (Wanda's |W|·‖x‖, summed over a unit's weights);
- ``flap``: keep the k units with the largest Var(h_j)·‖V_:j‖², the removed units' mean moved into the bias.

No retraining. Every statistic (path metric, ‖h‖, Var h, mean h) comes from the training split; the test split is
used only for the reported MSE (standardized targets). Datasets: ``lorenz`` (synthetic, known ground truth: the
next state of the Lorenz system after Δt = 0.05 from the current one, exact RK4 flow, no noise), ``friedman1``
(sklearn's make_friedman1, noise 1) and ``diabetes`` (sklearn's bundled load_diabetes).
Writes README.md (command, machine, date, tables), rows.json and mse_vs_units.png to --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from hf_fibration.core.afde import AFDEDendrogram, encoding_error, lump_mlp, mlp_forward, trajectory_mismatch
from hf_fibration.core.compensate import importance
from hf_fibration.core.fibers import FiberDendrogram, FiberPartition, colored_in_weights
from hf_fibration.core.merging import inout_rows
from hf_fibration.core.selection import keep_top
from hf_fibration.evaluation.results_io import command_line, preamble_markdown, print_preamble, write_json

METHODS = ("afde", "afde-nodata", "fibration", "inout", "magnitude", "wanda", "flap")
COUNTS = (64, 48, 32, 24, 16, 12, 8, 4)
Layer = tuple[torch.Tensor, torch.Tensor]


# ------------------------------------------------------------------------------------------------------- data
def lorenz(seed: int, n: int = 6000, dt: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """States x_t and x_{t+Δt} along one Lorenz trajectory (σ 10, ρ 28, β 8/3) after a burn-in."""
    rng = np.random.default_rng(seed)

    def f(s: np.ndarray) -> np.ndarray:
        x, y, z = s
        return np.array([10.0 * (y - x), x * (28.0 - z) - y, x * y - 8.0 / 3.0 * z])

    def flow(s: np.ndarray) -> np.ndarray:
        h = dt / 10
        for _ in range(10):
            k1 = f(s)
            k2 = f(s + h / 2 * k1)
            k3 = f(s + h / 2 * k2)
            k4 = f(s + h * k3)
            s = s + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return s

    s = rng.normal(size=3) + np.array([1.0, 1.0, 25.0])
    for _ in range(200):
        s = flow(s)
    states = [s]
    for _ in range(n):
        states.append(flow(states[-1]))
    states = np.array(states)
    return states[:-1], states[1:]


def dataset(name: str, seed: int) -> tuple[torch.Tensor, ...]:
    """Standardized (by the training split) x_train, y_train, x_test, y_test; test = the last 1/3 (lorenz: later
    in time) or a seeded 30% split."""
    if name == "lorenz":
        x, y = lorenz(seed)
        cut = len(x) * 2 // 3
        x_tr, y_tr, x_te, y_te = x[:cut], y[:cut], x[cut:], y[cut:]
    else:
        from sklearn.datasets import load_diabetes, make_friedman1
        from sklearn.model_selection import train_test_split

        if name == "friedman1":
            x, y = make_friedman1(n_samples=3000, noise=1.0, random_state=seed)
        elif name == "diabetes":
            x, y = load_diabetes(return_X_y=True)
        else:
            raise ValueError(f"Unknown dataset {name!r}.")
        x_tr, x_te, y_tr, y_te = train_test_split(x, y.reshape(len(y), -1), test_size=0.3, random_state=seed)
    mx, sx = x_tr.mean(0), x_tr.std(0)
    my, sy = y_tr.mean(0), y_tr.std(0)
    return tuple(torch.tensor(a, dtype=torch.float64) for a in ((x_tr - mx) / sx, (y_tr - my) / sy,
                                                                  (x_te - mx) / sx, (y_te - my) / sy))


# ------------------------------------------------------------------------------------------------------ model
def train(x: torch.Tensor, y: torch.Tensor, seed: int, hidden: int, steps: int) -> list[Layer]:
    """Full-batch Adam on 80% of the training split, the best state on the other 20% kept (early stopping)."""
    torch.manual_seed(seed)
    perm = torch.randperm(len(x))
    val, fit = perm[: len(x) // 5], perm[len(x) // 5:]
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                              torch.nn.Tanh(), torch.nn.Linear(hidden, y.shape[1])).double()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    best, best_state = float("inf"), None
    for step in range(steps):
        loss = torch.nn.functional.mse_loss(net(x[fit]), y[fit])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            with torch.no_grad():
                v = float(torch.nn.functional.mse_loss(net(x[val]), y[val]))
            if v < best:
                best, best_state = v, {k: t.clone() for k, t in net.state_dict().items()}
    net.load_state_dict(best_state)
    return [(m.weight.detach().clone(), m.bias.detach().clone()) for m in net if isinstance(m, torch.nn.Linear)]


def hidden_inputs(layers: list[Layer], x: torch.Tensor, index: int) -> torch.Tensor:
    """What enters layer ``index`` (0: x itself)."""
    h = x
    for w, b in layers[:index]:
        h = torch.tanh(h @ w.T + b)
    return h


def reduce(layers: list[Layer], x: torch.Tensor, method: str, k: int) -> list[Layer]:
    """Both hidden layers cut to k units by ``method``, layer by layer on the current network."""
    layers = [(w.clone(), b.clone()) for w, b in layers]
    for index in range(len(layers) - 1):
        (w, b), w_next = layers[index], layers[index + 1][0]
        inputs = hidden_inputs(layers, x, index)
        h = torch.tanh(inputs @ w.T + b)
        part = partition(method, w, b, w_next, inputs, h, k)
        partitions: list[FiberPartition | None] = [None] * (len(layers) - 1)
        partitions[index] = part
        shift = None
        if method == "flap":
            removed = part.labels < 0
            shift = w_next[:, removed] @ h[:, removed].mean(0)
        layers = lump_mlp(layers, partitions)
        if shift is not None:
            w2, b2 = layers[index + 1]
            layers[index + 1] = (w2, b2 + shift)
    return layers


def partition(method: str, w: torch.Tensor, b: torch.Tensor, w_next: torch.Tensor, inputs: torch.Tensor,
              h: torch.Tensor, k: int) -> FiberPartition:
    if method == "afde":
        return AFDEDendrogram([(w, b)], w_next, "tanh", inputs).cut_to_count(k)
    if method == "afde-nodata":
        return AFDEDendrogram([(w, b)], w_next, "tanh").cut_to_count(k)
    if method == "fibration":
        return FiberDendrogram(colored_in_weights(w, b), "complete").cut_to_count(k)
    if method == "inout":
        return FiberDendrogram(inout_rows(colored_in_weights(w, b), w_next), "complete").cut_to_count(k)
    if method == "magnitude":
        return keep_top(importance("l2", w, w_next, None), k)
    if method == "wanda":
        return keep_top(importance("wanda-sp", w, w_next, h), k)
    if method == "flap":
        return keep_top(importance("flap", w, w_next, h), k)
    raise ValueError(f"Unknown method {method!r}.")


def mse(layers: list[Layer], x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(mlp_forward(layers, "tanh", x), y))


# ------------------------------------------------------------------------------------------------------- run
def run(name: str, seeds: int, hidden: int, steps: int, counts: tuple[int, ...]) -> dict:
    rows, checks = [], []
    for seed in range(seeds):
        x_tr, y_tr, x_te, y_te = dataset(name, seed)
        layers = train(x_tr, y_tr, seed, hidden, steps)
        base = mse(layers, x_te, y_te)
        probe = x_te[:256]
        check = {"seed": seed, "encoding_error": encoding_error(layers, "tanh", probe)}
        for k in counts:
            row = {"dataset": name, "seed": seed, "units": k, "base": base}
            for method in METHODS:
                reduced = reduce(layers, x_tr, method, k)
                row[method] = mse(reduced, x_te, y_te)
                if method == "afde":
                    check[f"mismatch_{k}"] = trajectory_mismatch(layers, reduced, "tanh", probe)
            rows.append(row)
            print(f"{name} seed {seed} k {k:3d} base {base:.3g} " +
                  " ".join(f"{m} {row[m]:.3g}" for m in METHODS), flush=True)
        first = AFDEDendrogram([layers[0]], layers[1][0], "tanh", x_tr)
        check["epsilon_first_layer"] = {k: first.epsilon_for_count(k) for k in counts}
        checks.append(check)
    return {"rows": rows, "checks": checks}


def summarize(rows: list[dict], counts: tuple[int, ...]) -> list[dict]:
    out = []
    for k in counts:
        sel = [r for r in rows if r["units"] == k]
        base = [r["base"] for r in sel]
        entry = {"units": k, "base": (float(np.mean(base)), float(np.std(base)))}
        for m in METHODS:
            vals = [r[m] for r in sel]
            entry[m] = (float(np.mean(vals)), float(np.std(vals)))
        entry["wins"] = {m: sum(min(METHODS, key=lambda mm, r=r: r[mm]) == m for r in sel) for m in METHODS}
        out.append(entry)
    return out


def table(summary: list[dict]) -> list[str]:
    head = "| kept units (of 64, per layer) | " + " | ".join(METHODS) + " |"
    lines = [head, "|" + "---|" * (len(METHODS) + 1)]
    for e in summary:
        best = min(METHODS, key=lambda m: e[m][0])
        cells = [(f"**{e[m][0]:.3g} ± {e[m][1]:.2g}**" if m == best else f"{e[m][0]:.3g} ± {e[m][1]:.2g}")
                 for m in METHODS]
        lines.append(f"| {e['units']} | " + " | ".join(cells) + " |")
    return lines


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (name, summary) in zip(axes[0], results.items(), strict=True):
        units = [e["units"] for e in summary]
        for m in METHODS:
            mean = np.array([e[m][0] for e in summary])
            std = np.array([e[m][1] for e in summary])
            ax.errorbar(units, mean, yerr=std, marker="o", ms=3, capsize=2, label=m,
                        lw=2 if m.startswith("afde") else 1)
        ax.axhline(summary[0]["base"][0], color="gray", ls="--", lw=1, label="uncompressed")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("kept hidden units per layer (of 64)")
        ax.set_ylabel("test MSE (standardized)")
        ax.set_title(name)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["lorenz", "friedman1", "diabetes"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    parser.add_argument("--out", default="results/afde")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    head = print_preamble(command_line(__file__, argv))
    counts = tuple(c for c in args.counts if c <= args.hidden)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw, summaries = {}, {}
    for name in args.datasets:
        raw[name] = run(name, args.seeds, args.hidden, args.steps, counts)
        summaries[name] = summarize(raw[name]["rows"], counts)
    write_json(out / "rows.json", head, results=raw, summary=summaries)
    plot(summaries, out / "mse_vs_units.png")
    lines = ["# AFDE vs fibration and pruning on tanh regression MLPs", "", preamble_markdown(head).rstrip()]
    for name, summary in summaries.items():
        checks = raw[name]["checks"]
        enc = max(c["encoding_error"] for c in checks)
        lines += ["", f"## {name}", "", f"Uncompressed test MSE {summary[0]['base'][0]:.3g} ± "
                  f"{summary[0]['base'][1]:.2g}; ODE encoding error (max |y_ODE(s) − net(s·x)|, RK4 128 steps, 256 "
                  f"test inputs) ≤ {enc:.1e}.", ""]
        lines += table(summary)
        wins = {m: sum(e["wins"][m] for e in summary if e["units"] < args.hidden) for m in METHODS}
        lines += ["", "Best method per (seed, kept units < width): " +
                  ", ".join(f"{m} {w}" for m, w in wins.items() if w)]
        mism = {k: max(c[f"mismatch_{k}"] for c in checks) for k in counts}
        lines += ["", "AFDE lumped vs original, max ODE-trajectory mismatch over s ∈ [0, 1] (256 test inputs): " +
                  ", ".join(f"{k}: {v:.2g}" for k, v in mism.items())]
    (out / "tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"summary": summaries, "checks": {n: r["checks"] for n, r in raw.items()}}


if __name__ == "__main__":
    main()
