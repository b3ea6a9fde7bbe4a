"""Why the block search compresses a small over-fitted model less than the greedy search, and what does not fix it:
variants of `hf-fibration compress --search block` on runs/seed-regime/d128 (span fibers, compensated, local cut
pricing, τ 0.01, held-out check on half of 256 val pairs), each a patch of the block search's private steps for
this experiment only (none of them is in the product).

    python scripts/block_vs_greedy.py [--modes none greedy loss-block loss-site loss-kind sequential topup-1 ...]

Modes: ``none`` (the product's block search), ``greedy`` (the product's greedy search); ``loss-block`` /
``loss-site`` / ``loss-kind``: each block's / site's / kind's error curve scaled by the loss change its middle cut
causes (one full evaluation per group, negative scales floored at 1% of the median positive one); ``sequential``:
the bisection's allocations applied with refits recalibrated on the model as the earlier sites leave it;
``topup-N``: after the bisection, up to N rounds in which each site tries its next cut down (cheapest block error
per parameter first), kept when the full evaluation stays within the bound; ``taylor``: block runs priced by
gᵀδ + ½ δᵀFδ (true-label gradient and sampled Fisher at the block output); ``fisher`` / ``forward`` /
``forward-fisher``: the product's own options ``--block-error fisher`` and ``--cut-pricing forward`` (a block run
per cut instead of the site-output error scaled once per site), alone and together. Unseen data: test_2016_flickr.
"""

from __future__ import annotations

import argparse
import copy
import re
import time
from pathlib import Path

import torch
from bench_block_search import sets

from hf_fibration import FibrationConfig
from hf_fibration.evaluation.evalset import batch_loss_sum, evaluate_loss, task_loss
from hf_fibration.evaluation.results_io import (
    command_line,
    keep_row,
    preamble_markdown,
    print_preamble,
    read_rows,
)
from hf_fibration.pipeline import fisher as fisher_module
from hf_fibration.pipeline.blocks import CalibrationPasses, block_of, first_output, stacks_of
from hf_fibration.pipeline.loop import calibrate, calibrates
from hf_fibration.policies import block_search as B
from hf_fibration.policies import search as S
from hf_fibration.repair.calibration import refitter

MODEL = "runs/seed-regime/d128"


def _loss_scaled(mode: str):
    curves_of = B.site_error_curves

    def patched(model, config, evalset, sites, progress=True, **kw):
        curves = curves_of(model, config, evalset, sites, progress, **kw)
        base = evaluate_loss(model, evalset)
        _, position = stacks_of(model)
        groups: dict = {}
        for site in sites:
            key = (block_of(site, position) if mode == "loss-block" else
                   re.sub(r"layers\.\d+\.", "", site.name) if mode == "loss-kind" else site.name)
            groups.setdefault(key, []).append(site)
        scales = {}
        for key, group in groups.items():
            middle = {}
            for site in group:
                changed = [c for c in curves.get(site.name, []) if c["error"] > 0]
                if changed:
                    middle[site.name] = changed[len(changed) // 2]
            if middle:
                applied = B._apply(model, group, middle)
                try:
                    delta = evaluate_loss(model, evalset) - base
                finally:
                    B._undo(model, applied)
                scales[key] = delta / sum(c["error"] for c in middle.values())
        positive = sorted(s for s in scales.values() if s > 0)
        floor = 0.01 * positive[len(positive) // 2] if positive else 1.0
        for key, group in groups.items():
            for site in group:
                for cut in curves.get(site.name, []):
                    cut["error"] *= max(scales.get(key, floor), floor)
        return curves

    B.site_error_curves = patched


def _sequential(state: dict):
    def apply(model, sites, chosen):
        evalset, config = state["evalset"], state["config"]
        passes, applied = CalibrationPasses(model, sites, lambda i: batch_loss_sum(model, evalset, i)), []
        for site in sites:
            cut = chosen.get(site.name)
            if cut is None:
                continue
            calibration = None
            if calibrates(site, config):
                with passes.capturing(site) as run:
                    calibration = calibrate(model, config, site, evalset, run)
            site.apply(model, cut["partition"], refitter(calibration, config))
            applied.append(site)
        return applied

    B._apply = apply


def _top_up(rounds: int, counter: list[int]):
    refine, ladder = B._refine, B.allocation_ladder
    seen: dict = {}

    def keep_curves(curves, lo, hi, samples=256):
        seen["curves"] = curves
        return ladder(curves, lo, hi, samples)

    def topped(model, sites, evalset, bound, passed, failed, progress):
        best = refine(model, sites, evalset, bound, passed, failed, progress)
        chosen, value = best if best is not None else (passed, None)
        curves = seen["curves"]

        def next_cut(name):
            kept = curves[name][0]["params_before"] if chosen.get(name) is None else chosen[name]["params"]
            smaller = sorted((c for c in curves[name] if c["params"] < kept), key=lambda c: -c["params"])
            return smaller[0] if smaller else None

        def price(name):
            nxt, cut = next_cut(name), chosen.get(name)
            if nxt is None:
                return float("inf")
            kept = nxt["params_before"] if cut is None else cut["params"]
            return (nxt["error"] - (0.0 if cut is None else cut["error"])) / max(kept - nxt["params"], 1)

        for _ in range(rounds):
            improved = False
            for name in sorted(curves, key=price):
                nxt = next_cut(name)
                if nxt is None:
                    continue
                trial = {**chosen, name: nxt}
                loss, ok = B._loss_with(model, sites, trial, evalset, bound)
                counter[0] += 1
                if ok:
                    chosen, value, improved = trial, loss, True
            if not improved:
                break
        return chosen, value

    B._refine, B.allocation_ladder = topped, keep_curves


def _taylor():
    fisher = fisher_module.output_fisher

    def gradients(model, evalset, blocks):
        grads, outputs = {k: [] for k in blocks}, {}

        def keep(key):
            def hook(module, args, out):
                outputs[key] = first_output(out)
            return hook

        handles = [b.register_forward_hook(keep(k)) for k, b in blocks.items()]
        frozen = [p for p in model.parameters() if p.is_floating_point() and not p.requires_grad]
        for p in frozen:
            p.requires_grad_(True)
        try:
            for i in range(len(evalset.batches)):
                outputs.clear()
                with torch.enable_grad():
                    objective = task_loss(model, evalset, i) * evalset.weights[i]
                    keys = [k for k in blocks if k in outputs and outputs[k].requires_grad]
                    found = torch.autograd.grad(objective, [outputs[k] for k in keys], allow_unused=True)
                for k, g in zip(keys, found, strict=True):
                    grads[k].append(torch.zeros(outputs[k].shape) if g is None else g.detach().float().cpu())
        finally:
            for p in frozen:
                p.requires_grad_(False)
            for h in handles:
                h.remove()
        return grads

    def both(model, evalset, blocks, seed=0):
        f, g = fisher(model, evalset, blocks, seed), gradients(model, evalset, blocks)
        return {k: list(zip(f[k], g[k], strict=True)) for k in blocks}

    def taylor_error(self):
        error = 0.0
        for i, (call, h, y) in enumerate(zip(self.calls, self.hidden, self.reference, strict=False)):
            d = (B._run(self.block, call, h) - y).double()
            f, g = self.weights[i]
            error += float((f * d * d).sum() + 2 * (g * d).sum())  # × the caller's ½ / loss terms
        return error

    B.output_fisher, B._BlockError.__call__ = both, taylor_error


def run(mode: str, fibers: str) -> dict:
    state, counter = {}, [0]
    search_fn = B.block_search

    def remember(model, config, evalset, *args, **kwargs):
        state["evalset"], state["config"] = evalset, config
        return search_fn(model, config, evalset, *args, **kwargs)

    S.block_search = remember
    how, pricing, block_error = "block", "local", "relative"
    if mode == "greedy":
        how = "greedy"
    elif mode.startswith("loss-"):
        _loss_scaled(mode)
    elif mode == "sequential":
        _sequential(state)
    elif mode.startswith("topup-"):
        _top_up(int(mode.split("-")[1]), counter)
    elif mode == "taylor":
        _taylor()
        pricing, block_error = "forward", "fisher"
    elif mode in ("fisher", "forward", "forward-fisher"):  # the product's own pricing options
        pricing = "forward" if mode.startswith("forward") else "local"
        block_error = "fisher" if mode.endswith("fisher") else "relative"
    elif mode != "none":
        raise ValueError(f"unknown mode {mode!r}")
    model, search, unseen, _ = sets(MODEL, 256)
    compressed = copy.deepcopy(model)
    config = FibrationConfig(tolerance=0.01, search=how, fibers_from=fibers, cut_pricing=pricing,
                             block_error=block_error)
    cpu = time.process_time()
    report = S.greedy_search(compressed, config, search, progress=False)
    return {"mode": mode, "fibers_from": fibers, "ratio": report.non_embedding_ratio,
            "cpu_seconds": time.process_time() - cpu, "top_up_evaluations": counter[0],
            "holdout_base": report.holdout_base_loss, "holdout_loss": report.holdout_final_loss,
            "unseen_base": evaluate_loss(model, unseen), "unseen_loss": evaluate_loss(compressed, unseen)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["none", "greedy", "loss-block", "loss-site", "loss-kind",
                                                        "sequential", "topup-1", "topup-3", "topup-20", "taylor"])
    parser.add_argument("--fibers-from", nargs="+", default=["span"])
    parser.add_argument("--out", default="results/block_vs_greedy")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    head = print_preamble(command_line(__file__, argv), load=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(out / "rows.json")
    originals = (B.site_error_curves, B._apply, B._refine, B.allocation_ladder, B.output_fisher,
                 B._BlockError.__call__, S.block_search)
    for fibers in args.fibers_from:
        for mode in args.modes:
            if any(r["mode"] == mode and r["fibers_from"] == fibers for r in rows):
                continue
            try:
                row = run(mode, fibers)
            finally:  # each mode patches from the product's own steps
                (B.site_error_curves, B._apply, B._refine, B.allocation_ladder, B.output_fisher,
                 B._BlockError.__call__, S.block_search) = originals
            keep_row(rows, row, head, out / "rows.json")
    lines = ["# Block search vs greedy on a small over-fitted model: variants tried", "", preamble_markdown(head),
             f"{MODEL}, τ 0.01, compensated, local cut pricing unless named, held-out check on half of 256 val "
             "pairs; unseen = test_2016_flickr; CPU = process seconds on one thread.", "",
             "| mode | fibers | ratio | held-out (base → after) | unseen (base → after) | top-up evaluations | CPU |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['fibers_from']} | {r['ratio']:.3f}× | {r['holdout_base']:.4f} → "
                     f"{r['holdout_loss']:.4f} | {r['unseen_base']:.4f} → {r['unseen_loss']:.4f} | "
                     f"{r['top_up_evaluations'] or '–'} | {r['cpu_seconds']:.0f} s |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
