"""Tables, plots and the scaling-law fit of the Multi30k size series (the report stage of multi30k_series.py)."""

from __future__ import annotations

import json
from pathlib import Path

from hf_fibration.evaluation.results_io import write_rows
from hf_fibration.research.scaling import fit_power_law

HEADLINE_INCREASE = 0.041  # the seed's +4.1% loss


def load(runs: Path, sizes: list[int]) -> list[dict]:
    rows = []
    for d in sizes:
        folder = runs / f"d{d}"
        if not (folder / "results.json").exists() or not (folder / "compress.json").exists():
            print(f"d{d}: not trained or not compressed yet; left out of the report", flush=True)
            continue
        train = json.loads((folder / "results.json").read_text())
        row = {"d_model": d, "train": train, **json.loads((folder / "compress.json").read_text())}
        if (folder / "control.json").exists():  # the uncompressed model retuned with Alg. 2's retuning settings
            row["control"] = json.loads((folder / "control.json").read_text())
        rows.append(row)
    return rows


def headline(row: dict, variant: str = "plain") -> dict | None:
    """The most compressed Alg. 2 model (a retuned round or the final one) with val loss ≤ (1+4.1%)·L."""
    entry = row["alg2"].get(variant)
    if entry is None:
        return None
    limit = row["base"]["val_loss"] * (1 + HEADLINE_INCREASE)
    candidates = [{"what": "final", **entry["final"]}]
    candidates += [{"what": f"round {r['round']}", "non_embedding": r["non_embedding_params"],
                    "val_loss": r["loss_retuned"], "test_loss": r.get("test_loss")}
                   for r in entry["rounds"] if r["round"] != "final"]
    within = [c for c in candidates if c["val_loss"] <= limit]
    return min(within, key=lambda c: c["non_embedding"]) if within else None


def _retuned_rounds(entry: dict | None) -> int:
    return 0 if not entry else sum(1 for r in entry["rounds"] if r["round"] != "final")


def ratio(row: dict, non_embedding: int) -> float:
    return row["base"]["non_embedding"] / non_embedding


def report(args, head: dict[str, str]) -> dict:
    runs, out = Path(args.runs), Path(args.out)
    rows = load(runs, args.sizes)
    if not rows:
        raise SystemExit(f"No finished sizes under {runs}; run the train and compress stages first.")
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((runs / "meta.json").read_text()) if (runs / "meta.json").exists() else {}
    fits = scaling_fits(rows)
    slim = [{k: v for k, v in r.items() if k != "train"} | {"train": {k: v for k, v in r["train"].items()
                                                                       if k != "history"}} for r in rows]
    write_rows(out, slim, head, meta=meta, fits=fits)
    for row in rows:
        plot_size(row, out / f"fig3f_d{row['d_model']}.png")
    plot_all(rows, out / "retuned_all_sizes.png")
    plot_law(rows, fits, out / "scaling_law.png")
    notes = out / "notes.md"  # hand-written reading of the numbers, kept across re-runs of the report
    (out / "results.md").write_text(markdown(rows, fits, meta, head, notes.read_text() if notes.exists() else ""))
    print((out / "results.md").read_text())
    return {"rows": rows, "fits": fits}


def scaling_fits(rows: list[dict]) -> dict:
    fits = {}
    for split in ("test_loss", "val_loss"):
        converged = [(r["base"]["non_embedding"], r["base"][split]) for r in rows]
        picked = [(h["non_embedding"], h[split]) for h in (headline(r) for r in rows) if h and h.get(split)]
        if len(converged) >= 3:
            fits[f"converged_{split}"] = fit_power_law(*zip(*converged, strict=True))
        if len(picked) >= 3:
            fits[f"compressed_{split}"] = fit_power_law(*zip(*picked, strict=True))
    return fits


def _curve(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    points = sorted(points)
    return [p[0] for p in points], [p[1] for p in points]


def plot_size(row: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    base = row["base"]["val_loss"]
    styles = {"paper": ("tab:red", "greedy (Alg. 3), τ sweep"), "data-aware": ("tab:green", "greedy, data-aware")}
    for mode, (color, label) in styles.items():
        pts = [(ratio(row, g["non_embedding"]), g["val_loss"]) for g in row["greedy"].values() if g["mode"] == mode]
        if pts:
            ax.plot(*_curve(pts), "o-", color=color, label=label, ms=4)
    for variant, color in (("plain", "tab:orange"), ("distill", "tab:purple")):
        entry = row["alg2"].get(variant)
        if not _retuned_rounds(entry):
            continue
        rounds = [r for r in entry["rounds"] if r["round"] != "final"]
        xs = [1.0] + [ratio(row, r["non_embedding_params"]) for r in rounds]
        ax.plot(xs, [base] + [r["loss_retuned"] for r in rounds], "o-", color=color,
                label=f"Alg. 2 rounds, retuned ({variant})", ms=4)
        ax.plot([ratio(row, r["non_embedding_params"]) for r in rounds], [r["loss_compressed"] for r in rounds],
                "x", color=color, alpha=0.5, ms=5)
        ax.plot([ratio(row, entry["final"]["non_embedding"])], [entry["final"]["val_loss"]], "*", color=color,
                ms=12)
    for criterion, color in (("random", "tab:blue"), ("l2", "tab:pink")):
        pts = [(ratio(row, b["non_embedding"]), b["val_loss"]) for b in row["baselines"].values()
               if b["criterion"] == criterion]
        if pts:
            ax.plot(*_curve(pts), "s--", color=color, label=f"{criterion} pruning, same unit counts", ms=3)
    ax.axhline(base * (1 + HEADLINE_INCREASE), color="gray", ls=":", label="+4.1% of L")
    ax.set_xscale("log")
    ax.set_ylim(base * 0.97, base * 1.6)
    ax.set_xlabel("non-embedding compression factor")
    ax.set_ylabel("val loss (L = uncompressed)")
    ax.set_title(f"Multi30k de→en, Marian d_model = FFN = {row['d_model']} (x: after collapse, ★: Alg. 2 answer)",
                 fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_all(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    cmap = plt.get_cmap("viridis")
    for i, row in enumerate(rows):
        entry = row["alg2"].get("plain")
        if not entry:
            continue
        rounds = [r for r in entry["rounds"] if r["round"] != "final"]
        xs = [row["base"]["non_embedding"]] + [r["non_embedding_params"] for r in rounds]
        ys = [row["base"]["val_loss"]] + [r["loss_retuned"] for r in rounds]
        color = cmap(i / max(1, len(rows) - 1))
        ax.plot(xs, ys, "o-", color=color, ms=3, label=f"d {row['d_model']}")
        ax.plot([entry["final"]["non_embedding"]], [entry["final"]["val_loss"]], "*", color=color, ms=10)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("val loss after retuning")
    ax.set_title("Alg. 2 compress–retune curves of every size (★: the answer)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_law(rows: list[dict], fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    conv = [(r["base"]["non_embedding"], r["base"]["test_loss"]) for r in rows]
    comp = [(h["non_embedding"], h["test_loss"]) for h in (headline(r) for r in rows) if h and h.get("test_loss")]
    for pts, key, color, label in ((conv, "converged_test_loss", "tab:blue", "converged"),
                                   (comp, "compressed_test_loss", "tab:orange", "Alg. 2 at ≤ +4.1% val loss")):
        if not pts:
            continue
        ax.plot(*_curve(pts), "o", color=color)
        fit = fits.get(key)
        if fit:
            xs = sorted(p[0] for p in pts)
            ax.plot(xs, [fit["L0"] * x ** -fit["alpha"] for x in xs], "-", color=color,
                    label=f"{label}: L = {fit['L0']:.2f}·P^-{fit['alpha']:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_xlabel("non-embedding parameters P")
    ax.set_ylabel("test_2016_flickr loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _plain_log_ticks(ax) -> None:
    """Log axes spanning less than a decade get unreadable minor labels: keep the major ones, plain numbers."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    for axis in (ax.yaxis,):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())


def _fit_line(name: str, fit: dict | None) -> str:
    if not fit:
        return f"| {name} | – | – | – | – | – |"
    return (f"| {name} | {fit['alpha']:.4f} | [{fit['alpha_ci'][0]:.4f}, {fit['alpha_ci'][1]:.4f}] | "
            f"{fit['L0']:.3f} | [{fit['L0_ci'][0]:.3f}, {fit['L0_ci'][1]:.3f}] | {fit['r2']:.3f} |")


def markdown(rows: list[dict], fits: dict, meta: dict, head: dict[str, str], notes: str = "") -> str:
    lines = ["# Multi30k de→en size series: converged Marian models, Alg. 2 compress–retune, scaling law", ""]
    for stage, run in meta.items():
        lines.append(f"- {stage}: `{run['command']}` — {run['machine']}, {run['date']}")
    lines += [f"- report: `{head['command']}` — {head['machine']}, {head['date']}", "",
              "Data: L, the bound (1+ρ)·L, every ε search and every early stopping use the val split (1,014 pairs); "
              "test losses and BLEU (sacrebleu, greedy decoding) are on test_2016_flickr (1,000) and "
              "test_2017_flickr (1,000), which nothing else saw.", "", notes.strip(), "",
              "## Training (to convergence, early stopping on the val loss)", "",
              "| d_model = FFN | parameters | non-embedding | epochs | steps | stopped by | best val loss L | "
              "test_2016 BLEU | seconds | control: L after Alg. 2's retuning, uncompressed |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, c = r["train"], r.get("control")
        stop = ("early stopping" if t.get("early_stopped") else "time cap") if "early_stopped" in t else "?"
        control = (f"{c['val']:.4f} ({100 * (c['val'] / t['val_loss'] - 1):+.2f}%, {c['steps']} steps)"
                   if c else "–")
        lines.append(f"| {r['d_model']} | {t['parameters']:,} | {t['non_embedding_parameters']:,} | "
                     f"{t['epochs']} | {t['steps']} | {stop} | {t['val_loss']:.4f} | {t['test2016_bleu']:.2f} | "
                     f"{t['train_seconds_this_run']} | {control} |")
    lines += ["", "## Headline: largest non-embedding compression with val loss ≤ 1.041·L (Alg. 2)", "",
              "| d_model | non-emb. before | after | ratio | val loss L → | Δ val | test loss before → after | "
              "BLEU 2016 before → after | BLEU 2017 before → after | rounds run | loop ended by | seconds |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h, entry = headline(r), r["alg2"].get("plain")
        if not entry or not h:
            lines.append(f"| {r['d_model']} | {r['base']['non_embedding']:,} |" + " – |" * 10)
            continue
        fin, b = entry["final"], r["base"]
        bleu = ["{:.2f} → {:.2f}".format(b["bleu"].get(k, float("nan")), fin["bleu"].get(k, float("nan")))
                if h["what"] == "final" else f"{b['bleu'].get(k, float('nan')):.2f} → (round model)"
                for k in ("test_2016_flickr", "test_2017_flickr")]
        rounds = [x for x in entry["rounds"] if x["round"] != "final"]
        lines.append(
            f"| {r['d_model']} | {b['non_embedding']:,} | {h['non_embedding']:,} | "
            f"{ratio(r, h['non_embedding']):.2f}× | {b['val_loss']:.4f} → {h['val_loss']:.4f} | "
            f"{100 * (h['val_loss'] / b['val_loss'] - 1):+.2f}% | {b['test_loss']:.4f} → {h['test_loss']:.4f} | "
            f"{bleu[0]} | {bleu[1]} | {len(rounds)} | {entry['rounds'][-1].get('ended', '')} | "
            f"{entry['seconds']:.0f} |")
    lines += ["", "## Alg. 2 rounds (each round's ε's from a fresh greedy search of the retuned model)", ""]
    for r in rows:
        for variant, entry in r["alg2"].items():
            lines += [f"### d_model {r['d_model']}, {variant}", "",
                      "| round | searched non-emb. | non-emb. after ε×q | loss after collapse | after retuning | "
                      "test loss | steps | within bound | seconds |", "|---|---|---|---|---|---|---|---|---|"]
            for x in entry["rounds"]:
                if x["round"] == "final":
                    lines.append(f"| answer (closing search: {x['closing_search']}, ended: {x['ended']}) | | "
                                 f"{x['non_embedding_params']:,} | {x['loss_compressed']:.4f} | | "
                                 f"{entry['final']['test_loss']:.4f} | | {x['within_bound']} | |")
                    continue
                lines.append(f"| {x['round']} | {x['searched']['non_embedding_params']:,} | "
                             f"{x['non_embedding_params']:,} | {x['loss_compressed']:.4f} | {x['loss_retuned']:.4f} | "
                             f"{x.get('test_loss', float('nan')):.4f} | {x['steps']} | {x['within_bound']} | "
                             f"{x['seconds']:.0f} |")
            lines.append("")
    lines += ["## Greedy search alone, and pruning at the same unit counts (val loss)", "",
              "| d_model | τ | greedy non-emb. (ratio) | greedy | data-aware greedy non-emb. (ratio) | data-aware | "
              "random, same units | L2, same units |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for key, g in r["greedy"].items():
            if g["mode"] != "paper":
                continue
            da = r["greedy"].get(key.replace("paper", "data-aware"), {})
            rnd = r["baselines"].get(f"random @ greedy {key}", {}).get("val_loss", float("nan"))
            l2 = r["baselines"].get(f"l2 @ greedy {key}", {}).get("val_loss", float("nan"))
            da_text = (f"{da['non_embedding']:,} ({ratio(r, da['non_embedding']):.2f}×) | {da['val_loss']:.4f}"
                       if da else "– | –")
            lines.append(f"| {r['d_model']} | {g['tau']} | {g['non_embedding']:,} "
                         f"({ratio(r, g['non_embedding']):.2f}×) | {g['val_loss']:.4f} | {da_text} | {rnd:.4f} | "
                         f"{l2:.4f} |")
    lines += ["", "At the Alg. 2 answer's unit counts (no retuning for the baselines):", "",
              "| d_model | Alg. 2 answer | random | L2 |", "|---|---|---|---|"]
    for r in rows:
        if "plain" in r["alg2"]:
            fin = r["alg2"]["plain"]["final"]
            rnd = r["baselines"].get("random @ alg2 plain final", {}).get("val_loss", float("nan"))
            l2 = r["baselines"].get("l2 @ alg2 plain final", {}).get("val_loss", float("nan"))
            lines.append(f"| {r['d_model']} | {fin['val_loss']:.4f} | {rnd:.4f} | {l2:.4f} |")
    distilled = [r for r in rows if "plain" in r["alg2"] and _retuned_rounds(r["alg2"].get("distill"))]
    if distilled:
        lines += ["", "## Distillation vs plain retuning in Alg. 2 (same ρ, q, τ, patience; budgets as run)", "",
                  "| d_model | plain: ratio, val loss, BLEU 2016, rounds, seconds | distill: ratio, val loss, BLEU "
                  "2016, rounds, seconds |", "|---|---|---|"]
        for r in distilled:
            cells = []
            for variant in ("plain", "distill"):
                entry = r["alg2"][variant]
                fin = entry["final"]
                cells.append(f"{ratio(r, fin['non_embedding']):.2f}×, {fin['val_loss']:.4f}, "
                             f"{fin['bleu'].get('test_2016_flickr', float('nan')):.2f}, "
                             f"{_retuned_rounds(entry)}, {entry['seconds']:.0f}")
            lines.append(f"| {r['d_model']} | {cells[0]} | {cells[1]} |")
    span = max(r["base"]["non_embedding"] for r in rows) / min(r["base"]["non_embedding"] for r in rows)
    lines += ["", f"## Scaling law L = L0·P^−α (P non-embedding parameters; {len(rows)} sizes, {span:.1f}× span; "
              "95% t-intervals)", "", "| fit | α | 95% CI | L0 | 95% CI | R² |", "|---|---|---|---|---|---|"]
    for key in ("converged_test_loss", "compressed_test_loss", "converged_val_loss", "compressed_val_loss"):
        lines.append(_fit_line(key.replace("_", " "), fits.get(key)))
    lines += ["", "Seed (Fig. 3g): α 0.028 → 0.049, L0 3.0 → 3.8 after compression, on models up to 78M "
              "parameters. Plots: fig3f_d*.png (per size), retuned_all_sizes.png, scaling_law.png.", ""]
    return "\n".join(lines)
