"""The seed's Multi30k regime at a size this CPU runs to the end (issue: compression must beat training small).

    python scripts/seed_regime.py train  --sizes 128 64 32 96 48 --runs runs/seed-regime     # scratch series
    python scripts/seed_regime.py alg2   --sizes 128 --runs runs/seed-regime                 # Alg. 2 to its bound
    python scripts/seed_regime.py report --runs runs/seed-regime --out results/seed-regime

One fixed training set: the first ``--pairs`` Multi30k train pairs (400 pairs ≈ 9.3k word tokens, source + target),
so d 128 (0.80M non-embedding parameters) sees ≈ 1 word token per 86 parameters, inside the seed's 1:68–1:105, and
d 32 ≈ 1 per 5.6. The sentencepiece vocabulary is trained on the same pairs only. Models: Marian 3+3 layers,
8 heads, FFN = d_model, dropout 0.1, batch 128 pairs, Adam (0.9, 0.98, 1e-9), lr 1e-4 constant (the seed's Table
S2). Early stopping on the loss of the first ``--val-pairs`` val pairs, evaluated every ``--eval-every`` optimizer
steps, patience ``--patience-steps`` steps; the best weights are kept (the last ones are worse on val by
construction). The search and every early stopping see only those val pairs; every reported loss and BLEU
(sacrebleu, greedy decoding) is on test_2016_flickr and test_2017_flickr.

Resumable at every stage: a trained size (results.json) is skipped and an interrupted one resumes from its
checkpoint; Alg. 2 resumes round by round (hf_fibration.training.retune.compress_retune's ``output_dir``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_multi30k  # noqa: E402

import hf_fibration  # noqa: E402,F401  (registers the loader of compressed checkpoints)
from hf_fibration import FibrationConfig  # noqa: E402
from hf_fibration.config import FIBER_SOURCES  # noqa: E402
from hf_fibration.evaluation.evalset import evaluate_loss  # noqa: E402
from hf_fibration.evaluation.metrics import bleu  # noqa: E402
from hf_fibration.evaluation.results_io import command_line, print_preamble, write_json  # noqa: E402
from hf_fibration.integrations.marian_tokenizer import train_marian_tokenizer  # noqa: E402
from hf_fibration.models.surgery import non_embedding_parameters  # noqa: E402
from hf_fibration.training.retune import compress_retune, retune  # noqa: E402
from hf_fibration.training.retune_state import complete_state  # noqa: E402

TEST_SETS = ("test_2016_flickr", "test_2017_flickr")
# Alg. 2 variants, each one change from "seed" (paper collapse of weight fibers, average linkage as in the
# authors' code, retuning to convergence with the training's patience)
VARIANTS = {
    "seed": {},
    "short-retune": {"patience_steps": 50},  # patience 2 evaluations, as the landed series
    "distill": {"distill": True},  # KL to the uncompressed model during retuning (Minitron's lever)
    "data-aware": {"compensate": True, "fibers_from": "span" if "span" in FIBER_SOURCES else "activations"},
    "complete-linkage": {"linkage": "complete"},
}


class Data:
    """The fixed training subset, the val pairs for early stopping and the search, and the test sets."""

    def __init__(self, args, tokenizer) -> None:
        folder = Path(args.data)
        self.tokenizer = tokenizer
        src, tgt = train_multi30k.read_split(folder, "train", args.pairs)
        self.words = sum(len(s.split()) + len(t.split()) for s, t in zip(src, tgt, strict=True))
        self.train = train_multi30k.batches(tokenizer, src, tgt, args.batch_size, 64)
        self.val = train_multi30k.batches(tokenizer, *train_multi30k.read_split(folder, "val", args.val_pairs),
                                          128, 64)
        self.tests = {name: train_multi30k.read_split(folder, name) for name in TEST_SETS}
        self.test_sets = {name: train_multi30k.batches(tokenizer, *pairs, 128, 64)
                          for name, pairs in self.tests.items()}

    def measure(self, model, with_bleu: bool = True) -> dict:
        model.eval()
        out = {"non_embedding": non_embedding_parameters(model), "params": sum(p.numel() for p in model.parameters()),
               "val_loss": evaluate_loss(model, self.val),
               "test_loss": {name: evaluate_loss(model, s) for name, s in self.test_sets.items()}}
        if with_bleu:
            out["bleu"] = {name: bleu(model, self.tokenizer, *pairs, batch_size=128)
                           for name, pairs in self.tests.items()}
        return out


def tokenizer_for(args):
    import transformers as T

    folder = Path(args.runs) / "tokenizer"
    if (folder / "vocab.json").exists():
        return T.AutoTokenizer.from_pretrained(folder)
    src, tgt = train_multi30k.read_split(Path(args.data), "train", args.pairs)
    return train_marian_tokenizer(src + tgt, folder, vocab_size=args.vocab)


def stop_at(history: list[dict], patience_evals: int) -> dict:
    """Where a run with ``patience_evals`` would have stopped, read off a longer run's eval history (the runs are
    identical up to that point): its best loss and the step of that best."""
    best, best_step, bad = float("inf"), 0, 0
    for h in history:
        if h["eval_loss"] < best:
            best, best_step, bad = h["eval_loss"], h["step"], 0
        else:
            bad += 1
            if bad >= patience_evals:
                return {"best": best, "best_step": best_step, "stopped_step": h["step"]}
    return {"best": best, "best_step": best_step, "stopped_step": None}


def train_size(d: int, args, data: Data) -> dict:
    out = Path(args.runs) / f"d{d}"
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    head = print_preamble(command_line(__file__, [f"train --d {d}"] + args.rest))
    torch.manual_seed(args.seed)
    model = train_multi30k.build_model(data.tokenizer, d, 3, 8, None)
    ne = non_embedding_parameters(model)
    print(f"d {d}: {ne:,} non-embedding parameters, 1 word token per {ne / data.words:.1f}", flush=True)
    resume = complete_state(out / "retune_state") is not None
    start = time.perf_counter()
    patience = args.patience_steps // args.eval_every
    result = retune(model, data.train, data.val, epochs=10**6, learning_rate=args.lr, patience=patience,
                    eval_every=args.eval_every, output_dir=out, resume=resume, betas=(0.9, 0.98), adam_eps=1e-9,
                    seed=args.seed, progress=False)
    model.save_pretrained(out)
    data.tokenizer.save_pretrained(out)
    record = {"d_model": d, "words": data.words, "tokens_per_parameter": data.words / ne, "steps": result.steps,
              "early_stopped": result.stopped_early, "patience_steps": args.patience_steps,
              "eval_every": args.eval_every, "lr": args.lr, "weights": "best",
              "half_patience": stop_at(result.history, patience // 2),
              "seconds_this_run": round(time.perf_counter() - start, 1), **data.measure(model),
              "history": result.history}
    write_json(out / "results.json", head, **record)
    print(f"d {d}: {result.steps} steps, val {record['val_loss']:.4f}, test {record['test_loss']}, "
          f"BLEU {record['bleu']}", flush=True)
    return record


def alg2_size(d: int, variant: str, args, data: Data) -> dict:
    """Alg. 2 to its bound on the trained size d (resumable round by round), then the answer measured on test."""
    import transformers as T

    folder = Path(args.runs) / f"d{d}"
    out = folder / f"alg2-{variant}"
    if (out / "final.json").exists():
        return json.loads((out / "final.json").read_text())
    head = print_preamble(command_line(__file__, [f"alg2 --d {d} --variant {variant}"] + args.rest))
    trained = json.loads((folder / "results.json").read_text())
    base = T.MarianMTModel.from_pretrained(folder).eval()
    spec = VARIANTS[variant]
    config = FibrationConfig(tolerance=args.alg2_tau, search_steps=args.search_steps, parts=("attention", "mlp"),
                             linkage=spec.get("linkage", "average"), compensate=spec.get("compensate", False),
                             fibers_from=spec.get("fibers_from", "weights"), holdout_fraction=0.0)
    patience = spec.get("patience_steps", args.retune_patience_steps) // args.eval_every
    teacher = {"teacher": base, "distill_weight": args.distill_weight} if spec.get("distill") else {}
    log = lambda msg: print(f"[d{d} {variant} {time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731

    def on_round(row: dict, model) -> None:
        row["test_loss"] = {name: evaluate_loss(model, s) for name, s in data.test_sets.items()}
        log(f"round {row['round']}: {row['non_embedding_params']:,} non-embedding, val {row['loss_compressed']:.4f}"
            f" → {row['loss_retuned']:.4f} ({row['steps']} steps), test {row['test_loss']}")

    start = time.perf_counter()
    final, rows = compress_retune(
        copy.deepcopy(base), config, data.val, data.train, rho=args.rho, quench=args.quench,
        max_rounds=args.max_rounds, progress=False, base_loss=trained["val_loss"], on_round=on_round,
        output_dir=out, epochs=10**6, eval_every=args.eval_every, patience=patience, learning_rate=args.lr,
        betas=(0.9, 0.98), adam_eps=1e-9, seed=args.seed, **teacher)
    record = {"d_model": d, "variant": variant, "spec": spec, "tau": args.alg2_tau, "rho": args.rho,
              "quench": args.quench, "retune_patience_steps": patience * args.eval_every,
              "base": {k: trained[k] for k in ("non_embedding", "val_loss", "test_loss", "bleu")},
              "final": data.measure(final), "rows": rows, "seconds_this_run": round(time.perf_counter() - start, 1)}
    write_json(out / "final.json", head, **record)
    log(f"answer: {record['final']['non_embedding']:,} non-embedding, test {record['final']['test_loss']}, "
        f"BLEU {record['final']['bleu']}")
    return record


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("train", "alg2", "report"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 64, 32, 96, 48])
    parser.add_argument("--runs", default="runs/seed-regime")
    parser.add_argument("--out", default="results/seed-regime")
    parser.add_argument("--data", default=str(train_multi30k.DATA))
    parser.add_argument("--pairs", type=int, default=400, help="training pairs (the first N of train)")
    parser.add_argument("--val-pairs", type=int, default=256, help="val pairs for early stopping and the search")
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-every", type=int, default=25, help="optimizer steps between val evaluations")
    parser.add_argument("--patience-steps", type=int, default=600, help="steps without val improvement to stop")
    parser.add_argument("--variants", nargs="+", default=["seed"], choices=list(VARIANTS),
                        help="Alg. 2 variants to run (each one change from 'seed')")
    parser.add_argument("--alg2-tau", type=float, default=0.01, help="τ of every round's greedy search")
    parser.add_argument("--search-steps", type=int, default=8, help="bisection steps per site")
    parser.add_argument("--rho", type=float, default=0.041)
    parser.add_argument("--quench", type=float, default=1.05)
    parser.add_argument("--max-rounds", type=int, default=200)
    parser.add_argument("--retune-patience-steps", type=int, default=300,
                        help="Alg. 2 retuning patience in steps (results.json: half_patience vs patience)")
    parser.add_argument("--distill-weight", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.rest = argv[1:]
    torch.set_num_threads(args.threads)
    if not (Path(args.data) / "train.de.gz").exists():
        parser.exit(2, f"Multi30k not found in {args.data}; pass --data with the folder of train.de.gz etc.\n")
    if args.stage == "report":
        import seed_regime_report

        seed_regime_report.report(Path(args.runs), Path(args.out), args)
        return
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    data = Data(args, tokenizer_for(args))
    if args.stage == "train":
        for d in args.sizes:
            train_size(d, args, data)
    else:
        for d in args.sizes:
            for variant in args.variants:
                alg2_size(d, variant, args, data)


if __name__ == "__main__":
    main()
