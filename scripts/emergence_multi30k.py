"""Emergence of fibers, opfibers and covers while a Marian de→en model learns Multi30k (issue #14, item 2).

    python scripts/emergence_multi30k.py --run runs/emergence-multi30k-d128 --train -- \\
        --d-model 128 --epochs 11 --patience 3 --symmetry-every 100 --threads 1   # train, then render
    python scripts/emergence_multi30k.py --run runs/emergence-multi30k-d128        # render an existing run

With ``--train`` the arguments after ``--`` go to scripts/train_multi30k.py (``--out`` is the run folder;
``--symmetry-every 100`` is added when absent), whose ``SymmetryLogger`` hook writes symmetry.json: per MLP site
and ε, the fibers / opfibers / covers of the site's hidden units (each site a one-hidden-layer net between residual
streams, ε absolute as in research/emergence.py), the cover splits between measurements, the RMS of the sites'
weights, and BLEU on a slice of test_2016 at each epoch end. This script writes results.md, emergence.png and
history.json to --out from it and the run's results.json (val loss per epoch, final BLEU). A "## Reading" section
already in --out/results.md (written by hand) is kept when the file is rendered again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_fibration.evaluation.results_io import command_line, preamble, preamble_markdown, write_json
from hf_fibration.research.emergence import KINDS
from hf_fibration.training.retune import STATE_DIR
from hf_fibration.training.retune_state import complete_state

READING = "## Reading"
COLORS = {"fibers": "tab:red", "opfibers": "tab:green", "covers": "tab:purple"}


def train(run: Path, train_args: list[str]) -> dict:
    """Run scripts/train_multi30k.py's main with ``--out run`` and the symmetry logger on."""
    import train_multi30k  # a sibling script: scripts/ is on the path when this one runs

    extra = [] if "--symmetry-every" in train_args else ["--symmetry-every", "100"]
    return train_multi30k.main(["--out", str(run), *extra, *train_args])


def site_units(run: Path, sym: dict) -> dict[str, int]:
    """Hidden units per MLP site: from symmetry.json, else from the run's config.json (FFN width per side)."""
    if sym.get("site_units"):
        return sym["site_units"]
    config = json.loads((run / "config.json").read_text())
    names = dict.fromkeys(k.split("/")[1] for k in sym["history"][0] if k.count("/") == 2 and "/fibers@" in k)
    return {n: config["encoder_ffn_dim" if ".encoder." in n else "decoder_ffn_dim"] for n in names}


def load(run: Path) -> dict:
    """symmetry.json and, when training finished, results.json of a run folder."""
    sym = json.loads((run / "symmetry.json").read_text())
    res = json.loads((run / "results.json").read_text()) if (run / "results.json").exists() else {}
    state = complete_state(run / STATE_DIR)
    if state is not None:  # retune's checkpoint has the val loss before training, and the history when unfinished
        progress = json.loads((state / "trainer.json").read_text())
        sym["initial_val_loss"] = progress.get("initial")
        res.setdefault("history", progress["history"])
    return {"symmetry": sym, "results": res, "units": site_units(run, sym)}


def key(kind: str, eps: float, site: str | None = None) -> str:
    return f"symmetry/{kind}@{eps:g}" if site is None else f"symmetry/{site}/{kind}@{eps:g}"


def short(site: str) -> str:
    """model.encoder.layers.0.fc1 → enc 0."""
    parts = site.split(".")
    return f"{parts[1][:3]} {parts[3]}" if len(parts) > 3 else site


def most_changed(history: list[dict], eps: tuple[float, ...]) -> float:
    """The ε whose summed cover count changes most between the first and the last measurement."""
    return max(eps, key=lambda e: abs(history[-1][key("covers", e)] - history[0][key("covers", e)]))


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sym, res, units = data["symmetry"], data["results"], data["units"]
    history, eps = sym["history"], tuple(sym["epsilons"])
    total = sum(units.values())
    steps = [h["step"] for h in history]
    cols = max(len(eps), 4)
    fig, axes = plt.subplots(2, cols, figsize=(3.5 * cols, 6.8), squeeze=False)
    for ax, e in zip(axes[0], eps, strict=False):
        for kind in KINDS:
            ax.plot(steps, [h[key(kind, e)] / total for h in history], "--" if kind == "covers" else "-",
                    label=kind, color=COLORS[kind])  # covers dashed: they coincide with the flavored opfibers
        ax.set_title(f"ε = {e:g}")
        ax.set_xlabel("optimizer step")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel(f"classes / {total} hidden units")
    axes[0][0].legend(loc="lower right")
    for ax in axes[0][len(eps):]:
        ax.axis("off")
    ax = axes[1][0]
    evals = [(0, sym["initial_val_loss"])] if sym.get("initial_val_loss") is not None else []
    evals += [(h["step"], h["eval_loss"]) for h in res.get("history", [])]
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", color="k", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("val loss")
    ax.set_title("val loss / BLEU")
    if sym.get("bleu"):
        twin = ax.twinx()
        twin.plot([b["step"] for b in sym["bleu"]], [b["bleu"] for b in sym["bleu"]], "s--", color="tab:blue")
        twin.set_ylabel(f"BLEU, first {sym['bleu_sentences']} test_2016", color="tab:blue")
    e_site = most_changed(history, eps)
    ax = axes[1][1]
    for site, n in units.items():
        ax.plot(steps, [h[key("covers", e_site, site)] / n for h in history], label=short(site))
    ax.set_title(f"covers per site, ε = {e_site:g}")
    ax.set_xlabel("optimizer step")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax = axes[1][2]
    for e in eps:
        pts = [(h["step"], h[key("cover_splits", e)]) for h in history if key("cover_splits", e) in h]
        if pts:
            ax.plot(*zip(*pts, strict=True), ".-", label=f"ε = {e:g}")
    ax.set_title("cover splits since the last measurement")
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=7)
    ax = axes[1][3]
    for side, style in (("in", "-"), ("out", "--")):
        ax.plot(steps, [h[f"weight_rms/{side}"] for h in history], style, color="k", label=f"{side}-weights")
    ax.set_title("RMS of the sites' weights")
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=7)
    for ax in axes[1][4:]:
        ax.axis("off")
    fig.suptitle(f"Marian de→en on Multi30k, d_model {res.get('d_model', '?')}, FFN {res.get('ffn', '?')}: "
                 f"fibers / opfibers / covers of the {len(units)} MLP sites ({total} hidden units)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_rows(data: dict) -> list[dict]:
    """Step 0 and every epoch end: val loss, BLEU and the summed counts per ε."""
    sym, res = data["symmetry"], data["results"]
    per_epoch = sym["steps_per_epoch"]
    loss = {0: sym.get("initial_val_loss"), **{h["step"]: h["eval_loss"] for h in res.get("history", [])}}
    bleu = {b["step"]: b["bleu"] for b in sym.get("bleu", [])}
    picks = [h for h in sym["history"] if h["step"] % per_epoch == 0 or h["step"] == sym["history"][-1]["step"]]
    return [{**h, "epoch": h["step"] / per_epoch, "val_loss": loss.get(h["step"]), "bleu": bleu.get(h["step"])}
            for h in picks]


def fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def write_md(data: dict, head: dict, path: Path) -> None:
    sym, res, units = data["symmetry"], data["results"], data["units"]
    history, eps = sym["history"], tuple(sym["epsilons"])
    total = sum(units.values())
    first, last = history[0], history[-1]
    lines = [
        "# Emergence of fibers, opfibers and covers: Marian de→en on Multi30k", "",
        *preamble_markdown(head).splitlines(),
        f"- training: `{sym['command']}` — {sym['machine']}, {sym['date']}",
    ]
    if res:
        lines.append(
            f"- model: Marian {res['d_model']}-d, FFN {res['ffn']}, {res['parameters']:,} parameters "
            f"({res['non_embedding_parameters']:,} non-embedding); {res['steps']} optimizer steps = "
            f"{res['steps'] / sym['steps_per_epoch']:.2f} epochs of {sym['steps_per_epoch']} steps in "
            f"{res['train_seconds_this_run'] / 60:.1f} min; "
            f"{'stopped early' if res['early_stopped'] else 'not stopped early'}; "
            f"best val loss {res['val_loss']:.3f}, test_2016 BLEU {res['test2016_bleu']:.2f} (all sentences, the "
            "best-val-loss weights)")
    else:
        lines.append(f"- training did not finish (no results.json): last measurement at step {last['step']}")
    lines += [
        f"- measured with `hf_fibration.research.emergence.SymmetryLogger` every {sym['every']} steps and at each "
        "epoch end: "
        f"the {len(units)} MLP sites ({total} hidden units), each a one-hidden-layer net between residual streams "
        "whose units are all distinct colors (a local view); counts are summed over the sites",
        "- ε: colored in-/out-weights equal within ε in every coordinate (seed §3.2), absolute, complete linkage; "
        "ε = 0 is equality up to float32 rounding. The weights' scale (RMS columns) is what an absolute ε is "
        "measured against",
        f"- BLEU in the table: greedy, on the first {sym['bleu_sentences']} test_2016 sentences at each epoch end "
        "(the weights of that step); val loss: the full val split", "",
        "![emergence](emergence.png)", "",
        "| step | epoch | val loss | BLEU | RMS in / out | " + " | ".join(
            f"fibers / opfibers / covers @ε={e:g}" for e in eps) + " |",
        "|---|---|---|---|---|" + "---|" * len(eps),
    ]
    for r in table_rows(data):
        lines.append(f"| {r['step']} | {r['epoch']:.2f} | {fmt(r['val_loss'], '.3f')} | {fmt(r['bleu'], '.2f')} | "
                     f"{r['weight_rms/in']:.4f} / {r['weight_rms/out']:.4f} | " + " | ".join(
                         f"{r[key('fibers', e)]:.0f} / {r[key('opfibers', e)]:.0f} / {r[key('covers', e)]:.0f}"
                         for e in eps) + " |")
    lines += ["", f"Out of {total} hidden units. Covers per site, step {first['step']} → step {last['step']}:", "",
              "| site | units | " + " | ".join(f"ε={e:g}" for e in eps) + " |", "|---|---|" + "---|" * len(eps)]
    for site, n in units.items():
        lines.append(f"| {site} | {n} | " + " | ".join(
            f"{first[key('covers', e, site)]:.0f} → {last[key('covers', e, site)]:.0f}" for e in eps) + " |")
    lines += ["", "Cover splits between consecutive measurements (a cover of the earlier measurement spread over "
              "several later ones; Theorem 2.1 forbids it for exact covers under full-batch GD, and this is Adam on "
              "minibatches with dropout):", ""]
    for e in eps:
        split = [h[key("cover_splits", e)] for h in history if key("cover_splits", e) in h]
        nontrivial = sum(1 for h in history[:-1] if h[key("covers", e)] < total)
        half = len(split) // 2
        lines.append(f"- ε = {e:g}: {sum(split):.0f} splits over {len(split)} intervals "
                     f"(max {max(split, default=0):.0f} in one; first half {sum(split[:half]):.0f}, "
                     f"second half {sum(split[half:]):.0f}); "
                     f"{nontrivial} measurements had a non-trivial cover to split")
    before = path.read_text() if path.exists() else ""
    reading = before[before.index(READING):] if READING in before else ""
    path.write_text("\n".join(lines) + "\n" + ("\n" + reading if reading else ""))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="train_multi30k output folder (with symmetry.json)")
    parser.add_argument("--out", default="results/emergence/multi30k")
    parser.add_argument("--train", action="store_true", help="train first; arguments after -- go to train_multi30k")
    args, train_args = parser.parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]
    if train_args and not args.train:
        parser.error(f"unrecognized arguments {train_args} (training arguments need --train)")
    run, out = Path(args.run), Path(args.out)
    head = preamble(command_line(__file__, argv))
    if args.train:
        train(run, train_args)
    data = load(run)
    out.mkdir(parents=True, exist_ok=True)
    sym = data["symmetry"]
    write_json(out / "history.json", head, run=str(run), training={k: sym[k] for k in ("command", "machine", "date")},
               epsilons=sym["epsilons"], every=sym["every"], steps_per_epoch=sym["steps_per_epoch"],
               initial_val_loss=sym.get("initial_val_loss"),
               site_units=data["units"], final={k: v for k, v in data["results"].items() if k != "history"},
               eval_history=data["results"].get("history", []), bleu=sym.get("bleu", []), history=sym["history"])
    plot(data, out / "emergence.png")
    write_md(data, head, out / "results.md")
    print(f"wrote {out}/results.md, emergence.png, history.json", flush=True)
    return data


if __name__ == "__main__":
    main()
