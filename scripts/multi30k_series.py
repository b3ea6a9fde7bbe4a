"""The seed's Multi30k regime (Methods 5.3–5.4, Fig. 3f/3g): a size series of Marian 3+3 models (FFN = d_model)
trained to convergence, each compressed by the greedy search at several τ, by Alg. 2 (compress–retune), by random
and L2 pruning at the same unit counts and by the data-aware greedy search; then the headline and the scaling law.

    python scripts/multi30k_series.py train    --sizes 64 96 128 192 256 384 --runs runs/multi30k-series
    python scripts/multi30k_series.py compress --sizes 64 96 128 192 256 384 --runs runs/multi30k-series
    python scripts/multi30k_series.py report   --sizes 64 96 128 192 256 384 --runs runs/multi30k-series
    python scripts/multi30k_series.py all ... --jobs 6      # the three stages; sizes in parallel processes

Resumable at every stage: a trained size (results.json) is skipped and an interrupted one resumes from its
checkpoint; compress.json is written after every part (a greedy point, an Alg. 2 variant, a baseline) and finished
parts are skipped. Data: L, the bound (1+ρ)·L, every ε search, calibration and early stopping use the val split;
test losses and BLEU (sacrebleu, greedy decoding) are on test_2016_flickr and test_2017_flickr, which nothing
else sees. The report stage writes results.md, rows.json and the plots to --out.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import train_multi30k  # a sibling script (scripts/ is on the path when this one runs): its main is the train stage

from hf_fibration import FibrationConfig
from hf_fibration.core.compensate import importance
from hf_fibration.core.fibers import FiberPartition, colored_in_weights
from hf_fibration.core.modules import count_parameters
from hf_fibration.core.selection import keep_top
from hf_fibration.evaluation.evalset import evaluate_loss
from hf_fibration.evaluation.metrics import bleu
from hf_fibration.evaluation.results_io import command_line, print_preamble
from hf_fibration.models.sites import build_sites
from hf_fibration.models.surgery import get_module, linear_weight, non_embedding_parameters
from hf_fibration.policies.search import greedy_search
from hf_fibration.research.multi30k import DATA, batches, read_split
from hf_fibration.training.retune import compress_retune, retune

BLEU_SETS = ("test_2016_flickr", "test_2017_flickr")
# the greedy search as the seed runs it (plain collapse of weight fibers) and the tool's data-aware mode
MODES = {"paper": {"compensate": False, "fibers_from": "weights"},
         "data-aware": {"compensate": True, "fibers_from": "activations"}}
PARTS = ("attention", "mlp")


def fib_config(tolerance: float, mode: str, search_steps: int) -> FibrationConfig:
    """Search config; the search sees all of val (a held-out split of it, where supported, is turned off: the
    test splits are the held-out data here)."""
    names = {f.name for f in dataclasses.fields(FibrationConfig)}
    extra = {"holdout_fraction": 0.0} if "holdout_fraction" in names else {}
    return FibrationConfig(tolerance=tolerance, search_steps=search_steps, parts=PARTS, **MODES[mode], **extra)


def unit_counts(model) -> dict[str, int]:
    return {site.name: site.units(model) for site in build_sites(model, FibrationConfig(parts=PARTS))}


@torch.no_grad()
def prune_like(model, counts: dict[str, int], criterion: str, seed: int = 0) -> None:
    """Prune every site to ``counts[site]`` units by ``criterion`` (random / l2 of the in-weight rows).

    MLP units are dropped. Sites that write a full-width output (attention projections, fc2) keep k−1 scored rows
    and route the dropped slots to one zero row, so they hold k rows like the fibration model they match."""
    generator = torch.Generator().manual_seed(seed)
    for site in build_sites(model, FibrationConfig(parts=PARTS)):
        n, k = site.units(model), counts.get(site.name)
        if k is None or k >= n:
            continue
        rows = torch.cat([colored_in_weights(*linear_weight(get_module(model, m))) for m in site.modules_in()], 1)
        scores = importance(criterion, rows, None, None, generator)
        if site.kind == "mlp":
            site.apply(model, keep_top(scores, k))
        else:
            labels = keep_top(scores, k - 1).labels if k > 1 else torch.full((n,), -1, dtype=torch.long)
            labels[labels < 0] = k - 1
            site.apply(model, FiberPartition(labels, torch.ones(n, dtype=torch.float64)))
            layer = get_module(model, site.modules[0])
            layer.weight[k - 1].zero_()
            if layer.bias is not None:
                layer.bias[k - 1].zero_()
        site.commit()


class Size:
    """One trained size: its data on the device, and how to measure a (compressed) copy of it."""

    def __init__(self, folder: Path, args) -> None:
        import transformers as T

        self.device = args.device
        self.tok = T.AutoTokenizer.from_pretrained(folder)
        self.base = T.AutoModelForSeq2SeqLM.from_pretrained(folder).to(self.device).eval()
        data = Path(args.data)
        self.val = batches(self.tok, *read_split(data, "val", args.val_limit), args.eval_batch_size,
                           64).to(self.device)
        self.test = batches(self.tok, *read_split(data, BLEU_SETS[0], args.val_limit), args.eval_batch_size,
                            64).to(self.device)
        self.train = batches(self.tok, *read_split(data, "train", args.train_limit), 128, 64)
        self.bleu_sets = {name: read_split(data, name, args.bleu_limit) for name in BLEU_SETS
                          if (data / f"{name}.de.gz").exists()}
        self.bleu_batch = args.bleu_batch_size

    def measure(self, model, with_bleu: bool = False) -> dict:
        out = {"params": count_parameters(model), "non_embedding": non_embedding_parameters(model),
               "val_loss": evaluate_loss(model, self.val), "test_loss": evaluate_loss(model, self.test)}
        if with_bleu:
            out["bleu"] = {name: bleu(model, self.tok, src, tgt, batch_size=self.bleu_batch)
                           for name, (src, tgt) in self.bleu_sets.items()}
        return out


def compress_size(d: int, args) -> dict:
    folder = Path(args.runs) / f"d{d}"
    path = folder / "compress.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    for key in ("greedy", "alg2", "baselines"):
        record.setdefault(key, {})

    def save() -> None:
        path.write_text(json.dumps(record, indent=1) + "\n")

    size = Size(folder, args)
    log = lambda msg: print(f"[d{d} {time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    if "base" not in record:
        record["base"] = {**size.measure(size.base, with_bleu=True), "units": unit_counts(size.base)}
        save()
    base_loss = record["base"]["val_loss"]
    log(f"base: {record['base']['non_embedding']:,} non-embedding, val {base_loss:.4f}")

    def late() -> bool:
        return bool(args.deadline) and time.time() > args.deadline

    def greedy(mode: str) -> None:
        for tau in args.taus:
            key = f"{mode}:{tau}"
            if key in record["greedy"] or late():
                continue
            model, start = copy.deepcopy(size.base), time.perf_counter()
            greedy_search(model, fib_config(tau, mode, args.search_steps), size.val, progress=False)
            g = {"mode": mode, "tau": tau, **size.measure(model), "seconds": time.perf_counter() - start,
                 "units": unit_counts(model)}
            record["greedy"][key] = g
            save()
            log(f"greedy {key}: {g['non_embedding']:,} val {g['val_loss']:.4f} ({g['seconds']:.0f} s)")

    def alg2(variant: str) -> None:
        if variant in record["alg2"] or late():
            return
        model, start = copy.deepcopy(size.base), time.perf_counter()

        def on_round(row: dict, m) -> None:
            row.update(test_loss=evaluate_loss(m, size.test), units=unit_counts(m))
            log(f"alg2 {variant} round {row['round']}: {row['non_embedding_params']:,} "
                f"{row['loss_compressed']:.4f} → {row['loss_retuned']:.4f} ({row['steps']} steps)")

        teacher = {"teacher": size.base, "distill_weight": args.distill_weight} if variant == "distill" else {}
        budget = args.alg2_seconds
        if args.deadline:
            budget = min(budget, max(0.0, args.deadline - time.time() - 120))
        final, rows = compress_retune(
            model, fib_config(args.alg2_tau, "paper", args.search_steps), size.val, size.train, rho=args.rho,
            quench=args.quench, max_rounds=args.rounds, progress=False, base_loss=base_loss, on_round=on_round,
            time_budget_s=budget, epochs=args.retune_epochs, patience=args.retune_patience,
            learning_rate=args.retune_lr, betas=(0.9, 0.98), adam_eps=1e-9, **teacher)
        record["alg2"][variant] = {"rounds": rows, "seconds": time.perf_counter() - start,
                                   "final": {**size.measure(final, with_bleu=True), "units": unit_counts(final)}}
        save()
        fin = record["alg2"][variant]["final"]
        log(f"alg2 {variant} answer: {fin['non_embedding']:,} val {fin['val_loss']:.4f} bleu {fin['bleu']}")

    def control() -> None:
        """The uncompressed model retuned with Alg. 2's retuning settings: how much of a round's recovery is the
        retuning itself (a lower learning rate than training's), not the compression."""
        if (folder / "control.json").exists() or late():
            return
        model, start = copy.deepcopy(size.base), time.perf_counter()
        result = retune(model, size.train, size.val, epochs=args.retune_epochs, patience=args.retune_patience,
                        learning_rate=args.retune_lr, betas=(0.9, 0.98), adam_eps=1e-9, progress=False,
                        max_seconds=args.control_seconds)
        (folder / "control.json").write_text(json.dumps(
            {"d": d, "initial": result.initial_loss, "val": result.best_loss, "test": evaluate_loss(model, size.test),
             "steps": result.steps, "stopped_early": result.stopped_early, "seconds": time.perf_counter() - start}))
        log(f"control: val {result.initial_loss:.4f} → {result.best_loss:.4f}")

    def baselines() -> None:
        targets = {f"greedy {k}": v["units"] for k, v in record["greedy"].items() if v["mode"] == "paper"}
        for variant, entry in record["alg2"].items():
            targets.update({f"alg2 {variant} round {r['round']}": r["units"] for r in entry["rounds"] if "units" in r})
            targets[f"alg2 {variant} final"] = entry["final"]["units"]
        for criterion in ("random", "l2"):
            for label, units in targets.items():
                key = f"{criterion} @ {label}"
                if key in record["baselines"]:
                    continue
                model = copy.deepcopy(size.base)
                prune_like(model, units, criterion, seed=args.seed)
                record["baselines"][key] = {"criterion": criterion, "matches": label, **size.measure(model)}
                save()
        log(f"baselines: {len(record['baselines'])}")

    # in order of importance, so that a deadline cuts the least important parts; a failing part is logged and
    # recorded, and the others still run
    parts = [("greedy paper", lambda: greedy("paper")), ("alg2 plain", lambda: alg2("plain")),
             ("baselines", baselines), ("control", control), ("greedy data-aware", lambda: greedy("data-aware"))]
    if args.distill:
        parts += [("alg2 distill", lambda: alg2("distill")), ("baselines", baselines)]
    for name, part in parts:
        try:
            part()
        except Exception as err:  # noqa: BLE001  (one broken part must not lose the others' results)
            import traceback

            traceback.print_exc()
            record.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"
            save()
    log("done")
    return record


def train_size(d: int, args) -> None:
    out = Path(args.runs) / f"d{d}"
    if (out / "results.json").exists():
        return
    argv = ["--data", args.data, "--out", str(out), "--d-model", str(d), "--epochs", str(args.epochs),
            "--patience", str(args.patience), "--lr", str(args.lr), "--warmup", str(args.warmup),
            "--bleu-limit", str(args.bleu_limit or 1000), "--seed", str(args.seed), "--no-progress"]
    if args.train_limit:
        argv += ["--train-limit", str(args.train_limit)]
    if args.max_steps:
        argv += ["--max-steps", str(args.max_steps)]
    if args.max_minutes:
        argv += ["--max-minutes", str(args.max_minutes)]
    if args.vocab:
        argv += ["--vocab", str(args.vocab)]
    if (out / "retune_state" / "trainer.json").exists():
        argv.append("--resume")
    train_multi30k.main(argv)


def run_sizes(stages: tuple[str, ...], args, argv: list[str]) -> None:
    """Run ``stages`` for every size: one after another here, or with ``--jobs`` > 1 in parallel processes (one
    per size, each training then compressing its size, so a small size does not wait for a large one)."""
    work = {"train": train_size, "compress": compress_size}
    if args.jobs <= 1 or len(args.sizes) == 1:
        for d in args.sizes:
            for stage in stages:
                work[stage](d, args)
        return
    child_stage = "series" if stages == ("train", "compress") else stages[0]
    rest, skipping = [], False
    for a in argv[1:]:  # the options without --sizes/--jobs and their values
        if a in ("--sizes", "--jobs"):
            skipping = True
        elif skipping and not a.startswith("--"):
            continue
        else:
            skipping = False
            rest.append(a)
    pending, running, failed = list(args.sizes), [], []
    while pending or running:
        while pending and len(running) < args.jobs:
            d = pending.pop(0)
            log = open(Path(args.runs) / f"{child_stage}-d{d}.log", "a")  # noqa: SIM115
            cmd = [sys.executable, "-u", __file__, child_stage, "--sizes", str(d), "--jobs", "1", *rest]
            running.append((d, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(2)
        for d, proc in list(running):
            if proc.poll() is not None:
                running.remove((d, proc))
                print(f"{child_stage} d{d}: exit {proc.returncode}", flush=True)
                failed += [d] if proc.returncode else []
    if failed:
        print(f"{child_stage} failed for sizes {failed}; see {args.runs}/{child_stage}-d*.log", flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("train", "compress", "report", "series", "all"),
                        help="series = train then compress; all = series then report")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128, 192, 256, 384])
    parser.add_argument("--runs", default="runs/multi30k-series")
    parser.add_argument("--out", default="results/multi30k")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--jobs", type=int, default=1, help="sizes trained/compressed in parallel processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # training (scripts/train_multi30k.py)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--patience", type=int, default=5, help="epochs without val improvement before stopping")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--max-steps", type=int, help="smoke tests only")
    parser.add_argument("--max-minutes", type=float, help="cap on each size's training wall time")
    parser.add_argument("--train-limit", type=int, help="smoke tests only")
    parser.add_argument("--val-limit", type=int, help="smoke tests only")
    parser.add_argument("--bleu-limit", type=int, help="smoke tests only")
    # compression
    parser.add_argument("--taus", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--search-steps", type=int, default=6)
    parser.add_argument("--alg2-tau", type=float, default=0.01, help="τ of the greedy search in every Alg. 2 round")
    parser.add_argument("--rho", type=float, default=0.041)
    parser.add_argument("--quench", type=float, default=1.05)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--alg2-seconds", type=float, default=600, help="no new Alg. 2 round after this long")
    parser.add_argument("--retune-epochs", type=int, default=20)
    parser.add_argument("--retune-patience", type=int, default=2)
    parser.add_argument("--retune-lr", type=float, default=2e-4)
    parser.add_argument("--control-seconds", type=float, default=200, help="wall-time cap of the control retuning")
    parser.add_argument("--distill", action="store_true", help="also run Alg. 2 retuning by distillation")
    parser.add_argument("--distill-weight", type=float, default=0.5)
    parser.add_argument("--deadline", type=float, help="unix time after which no Alg. 2 variant starts")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--bleu-batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (Path(args.data) / "train.de.gz").exists():
        parser.exit(2, f"Multi30k not found in {args.data}; pass --data with the folder of train.de.gz etc.\n")
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    run = print_preamble(command_line(__file__, argv), device=args.device)
    stages = {"all": ("train", "compress", "report"), "series": ("train", "compress")}.get(args.stage, (args.stage,))
    meta_path = Path(args.runs) / "meta.json"
    if args.jobs > 1 or len(args.sizes) > 1 or not meta_path.exists():  # the parent process records the run
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        meta.update({stage: run for stage in stages if stage != "report"})
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    work = tuple(s for s in stages if s != "report")
    if work:
        run_sizes(work, args, argv)
    if "report" in stages:
        import multi30k_report

        multi30k_report.report(args, run)


if __name__ == "__main__":
    main()
