"""The report of scripts/seed_regime.py: results.md, rows.json and plots in --out (results/seed-regime).

Test loss = test_2016_flickr's token-weighted loss (test_2017_flickr beside it in the tables). The scratch law is
fitted to the trained sizes; every Alg. 2 point (each retuned round and each answer) is read against it and against
the trained sizes themselves (hf_fibration.research.scaling.advantage_over_scratch).
"""

from __future__ import annotations

import json
from pathlib import Path

from hf_fibration.evaluation.results_io import command_line, preamble, preamble_markdown, write_json
from hf_fibration.research.scaling import advantage_over_scratch, fit_power_law, frontier

PRIMARY = "test_2016_flickr"
SEED_PATIENCE_STEPS = 300  # seed_regime.py's --retune-patience-steps default
VARIANT_PATIENCE_STEPS = {"short-retune": 50}  # seed_regime.py's variants that set their own


def load(runs: Path) -> tuple[list[dict], list[dict]]:
    sizes = sorted((json.loads(p.read_text()) for p in runs.glob("d*/results.json")), key=lambda r: r["d_model"])
    alg2 = []
    for folder in sorted(runs.glob("d*/alg2-*")):
        final = folder / "final.json"
        record = folder / "alg2.json"
        if final.exists():
            alg2.append({**json.loads(final.read_text()), "finished": True})
        elif record.exists():  # a run still going: its finished rounds
            d, settings = int(folder.parent.name[1:]), json.loads(record.read_text())
            retune = settings["settings"]["retune"]
            alg2.append({"d_model": d, "variant": folder.name.removeprefix("alg2-"), "finished": False,
                         "rows": settings["rows"], "retune_patience_steps": retune["patience"] * retune["eval_every"]})
    for run in alg2:
        run["variant"] = _label(run)
    return sizes, alg2


def _label(run: dict) -> str:
    """The variant, and its retuning patience where it is not the variant's own (ablations run on the short patience
    once it was measured to give the seed variant's rounds exactly)."""
    patience = run.get("retune_patience_steps")
    own = VARIANT_PATIENCE_STEPS.get(run["variant"], SEED_PATIENCE_STEPS)
    return run["variant"] if patience in (None, own) else f"{run['variant']} (patience {patience} steps)"


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _by_sizes(row: dict) -> str:
    """The advantage by the trained sizes: interpolated, or a lower bound where the compressed model beats them all."""
    if row.get("advantage_sizes") is not None:
        return f"{row['advantage_sizes']:.2f}×"
    if row.get("advantage_at_least") is not None:
        return f"> {row['advantage_at_least']:.2f}× (beats every trained size)"
    return "–"


def report(runs: Path, out: Path, args) -> dict:
    sizes, alg2 = load(runs)
    if not sizes:
        raise SystemExit(f"{runs} holds no trained size yet; run the train stage first.")
    head = preamble(command_line("seed_regime.py", ["report", "--runs", str(runs), "--out", str(out)]))
    trained = [(s["non_embedding"], s["test_loss"][PRIMARY]) for s in sizes]
    law = fit_power_law(*zip(*trained, strict=True)) if len(trained) >= 3 else None

    def advantage(p: float, loss: float) -> dict:
        return advantage_over_scratch(p, loss, law, trained)
    points, lines = [], []
    for run in alg2:
        base = next((s for s in sizes if s["d_model"] == run["d_model"]), None)
        if base is None:
            continue
        for row in run["rows"]:
            if row["round"] == "final" or "test_loss" not in row:
                continue
            p, loss = row["non_embedding_params"], row["test_loss"][PRIMARY]
            points.append({"d_model": run["d_model"], "variant": run["variant"], "round": row["round"],
                           "non_embedding": p, "test_loss": loss, "val_loss": row["loss_retuned"],
                           "within_bound": row["within_bound"], "steps": row["steps"],
                           **advantage(p, loss)})
        if run["finished"]:
            fin = run["final"]
            steps = sum(r["steps"] for r in run["rows"] if r["round"] != "final")
            adv = advantage(fin["non_embedding"], fin["test_loss"][PRIMARY])
            lines.append({"d_model": run["d_model"], "variant": run["variant"],
                          "ratio": base["non_embedding"] / fin["non_embedding"],
                          "base_test": base["test_loss"][PRIMARY], "test": fin["test_loss"][PRIMARY],
                          "change": fin["test_loss"][PRIMARY] / base["test_loss"][PRIMARY] - 1,
                          "bleu_before": base["bleu"], "bleu_after": fin["bleu"], "retune_steps": steps,
                          "scratch_steps": base["steps"], "non_embedding": fin["non_embedding"], **adv})
    losses = sorted(p["test_loss"] for p in points)
    compressed_law = None
    front = frontier([(p["non_embedding"], p["test_loss"]) for p in points], losses)
    if len(front) >= 3:
        compressed_law = fit_power_law(*zip(*front, strict=True))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "rows.json", head, scratch=[{k: v for k, v in s.items() if k != "history"} for s in sizes],
               scratch_law=law, compressed_law=compressed_law, frontier=front, alg2_points=points, answers=lines)
    plot(sizes, points, law, compressed_law, out / "trajectories.png")
    (out / "results.md").write_text(markdown(head, sizes, law, compressed_law, points, lines, alg2))
    print((out / "results.md").read_text())
    return {"law": law, "answers": lines}


def plot(sizes: list[dict], points: list[dict], law: dict, compressed_law: dict | None, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    xs = [s["non_embedding"] for s in sizes]
    ax.plot(xs, [s["test_loss"][PRIMARY] for s in sizes], "ks", ms=7, label="trained from scratch")
    grid = np.geomspace(min(xs + [p["non_embedding"] for p in points]) / 1.3, max(xs) * 1.3, 50)
    if law is not None:
        ax.plot(grid, law["L0"] * grid ** -law["alpha"], "k--", lw=1, label=f"scratch law, α = {law['alpha']:.3f}")
    if compressed_law is not None:
        ax.plot(grid, compressed_law["L0"] * grid ** -compressed_law["alpha"], ":", color="tab:orange", lw=1.5,
                label=f"compressed frontier, α = {compressed_law['alpha']:.3f}")
    runs = sorted({(p["d_model"], p["variant"]) for p in points})
    for d, variant in runs:
        base = next(s for s in sizes if s["d_model"] == d)
        traj = [(base["non_embedding"], base["test_loss"][PRIMARY])] + [
            (p["non_embedding"], p["test_loss"]) for p in points if (p["d_model"], p["variant"]) == (d, variant)]
        ax.plot(*zip(*traj, strict=True), "o-", ms=3, label=f"Alg. 2 from d {d} ({variant})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("non-embedding parameters", fontsize=13)
    ax.set_ylabel(f"test loss ({PRIMARY})", fontsize=13)
    ax.tick_params(labelsize=11)
    ax.legend(fontsize=9)
    ax.set_title("Alg. 2 retune trajectories over the scratch frontier (Multi30k subset)", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def markdown(head: dict, sizes: list[dict], law: dict, compressed_law: dict | None, points: list[dict],
             lines: list[dict], alg2: list[dict]) -> str:
    md = ["# The seed's regime on a Multi30k subset: Alg. 2 against training small", "", preamble_markdown(head),
          "Commands of each stage (train, alg2) are in the rows' own records (runs/…/results.json, final.json); "
          "every loss below is on test_2016_flickr (test_2017_flickr beside it), BLEU on both (sacrebleu, greedy).",
          "", "## Trained from scratch (best weights by val early stopping)", "",
          "| d | non-embedding | parameters per word token | steps | val | test 2016 | test 2017 | BLEU 2016 "
          "| BLEU 2017 | best with half the patience |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in sizes:
        half = s["half_patience"]
        md.append(f"| {s['d_model']} | {s['non_embedding']:,} | {1 / s['tokens_per_parameter']:.1f} | {s['steps']} | "
                  f"{s['val_loss']:.4f} | {s['test_loss'][PRIMARY]:.4f} | {s['test_loss']['test_2017_flickr']:.4f} | "
                  f"{s['bleu'][PRIMARY]:.2f} | {s['bleu']['test_2017_flickr']:.2f} | "
                  f"{half['best']:.4f} (step {half['best_step']}) |")
    if law is None:
        md += ["", f"Scratch law: not fitted yet ({len(sizes)} trained size(s); the fit needs 3)."]
    else:
        md += ["", f"Scratch law: L = {law['L0']:.3f}·P^−{law['alpha']:.4f}, α 95% CI [{law['alpha_ci'][0]:.4f}, "
               f"{law['alpha_ci'][1]:.4f}], R² {law['r2']:.3f} ({law['points']} sizes)."]
    if compressed_law is not None:
        md.append(f"Compressed frontier (smallest Alg. 2 model at each loss, all rounds of all sizes): "
                  f"α = {compressed_law['alpha']:.4f} [{compressed_law['alpha_ci'][0]:.4f}, "
                  f"{compressed_law['alpha_ci'][1]:.4f}], {compressed_law['points']} points.")
    md += ["", "## Alg. 2 answers (last model within (1+ρ)·L on val)", "",
           "| d | variant | ratio | test before → after | change | BLEU 2016 | BLEU 2017 | retune steps | scratch "
           "steps | advantage over scratch (law / sizes) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in lines:
        md.append(f"| {r['d_model']} | {r['variant']} | {r['ratio']:.2f}× | {r['base_test']:.4f} → {r['test']:.4f} | "
                  f"{100 * r['change']:+.1f}% | {r['bleu_before'][PRIMARY]:.2f} → {r['bleu_after'][PRIMARY]:.2f} | "
                  f"{r['bleu_before']['test_2017_flickr']:.2f} → {r['bleu_after']['test_2017_flickr']:.2f} | "
                  f"{r['retune_steps']} | {r['scratch_steps']} | {_fmt(r['advantage_law'], '.2f')}× / "
                  f"{_by_sizes(r)} |")
    running = [a for a in alg2 if not a["finished"]]
    if running:
        md.append("")
        md.append("Not finished (running, or stopped: each run's log says which; rounds so far): " + ", ".join(
            f"d {a['d_model']} {a['variant']}: {len(a['rows'])} rounds" for a in running))
    md += ["", "## Every retuned round", "", "| d | variant | round | non-embedding | val | test 2016 | steps | "
           "within bound | advantage (law / sizes) |", "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        md.append(f"| {p['d_model']} | {p['variant']} | {p['round']} | {p['non_embedding']:,} | {p['val_loss']:.4f} | "
                  f"{p['test_loss']:.4f} | {p['steps']} | {p['within_bound']} | {_fmt(p['advantage_law'], '.2f')}× / "
                  f"{_by_sizes(p)} |")
    md += ["", "![trajectories](trajectories.png)", "", "## Runs", ""]
    md += [f"- train d {s['d_model']}: `{s['command']}` — {s['machine']}, {s['date']}" for s in sizes]
    md += [f"- Alg. 2 d {a['d_model']} {a['variant']}: `{a['command']}` — {a['machine']}, {a['date']}"
           for a in alg2 if a["finished"]]
    md.append("")
    return "\n".join(md)
