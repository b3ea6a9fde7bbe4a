"""Train a Marian-architecture de→en model on Multi30k (the seed's setup, CPU-sized by default) with accelerate.

    python scripts/train_multi30k.py --d-model 128 --out runs/multi30k-d128 [--epochs 40 --lr 5e-4 --warmup 400]
    python scripts/train_multi30k.py ... --resume          # continue an interrupted run from its checkpoint
    python scripts/train_multi30k.py ... --symmetry-every 100 --symmetry-eps 0 0.1 0.15 0.2 0.3   # watch symmetries

3+3 layers, 8 heads, FFN = d_model, Adam betas (0.9, 0.98), eps 1e-9, batch 128, early stopping on the val loss
(patience in epochs). The seed used lr 1e-4 and patience 20; on this CPU a higher lr with warmup converges in far
fewer epochs (pass --lr 1e-4 --warmup 0 --patience 20 for the seed's exact schedule). The output is a normal HF
directory (MarianMTModel + MarianTokenizer) that `hf-fibration compress DIR` takes like a hub id; results.json
beside it records val loss, test_2016 BLEU, parameters, wall time, machine and command.

With ``--symmetry-every N`` a ``hf_fibration.research.emergence.SymmetryLogger`` measures the fibers / opfibers /
covers of every MLP site at each ``--symmetry-eps`` before training, every N optimizer steps and at every epoch end
(where the val loss is taken), and BLEU on the first ``--symmetry-bleu`` test_2016 sentences at every epoch end; all
of it goes to symmetry.json in --out, rewritten at each measurement. ``--resume`` keeps the measurements up to the
checkpoint's step and continues the log; the first interval after a resume has no cover-split count. """

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import transformers as T
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from hf_fibration.evaluation.evalset import evaluate_loss
from hf_fibration.evaluation.metrics import bleu
from hf_fibration.evaluation.results_io import command_line, print_preamble, write_json
from hf_fibration.integrations.marian_tokenizer import train_marian_tokenizer
from hf_fibration.research.emergence import SymmetryLogger
from hf_fibration.research.multi30k import DATA, batches, build_model, read_split
from hf_fibration.research.training_runs import parameter_counts, save_results, size_text
from hf_fibration.training.retune import STATE_DIR, retune
from hf_fibration.training.retune_state import complete_state


def weight_rms(model: nn.Module) -> dict[str, float]:
    """Root mean square of the MLP sites' in-weights (fc1 weight and bias) and out-weights (fc2 weight): the scale
    that an absolute ε is measured against."""
    sums = {"in": [0.0, 0], "out": [0.0, 0]}
    with torch.no_grad():
        for name, module in model.named_modules():
            side = "in" if name.endswith(".fc1") else "out" if name.endswith(".fc2") else None
            if side is None:
                continue
            for t in (module.weight, module.bias) if side == "in" else (module.weight,):
                sums[side][0] += float(t.double().pow(2).sum())
                sums[side][1] += t.numel()
    return {f"weight_rms/{side}": (s / max(n, 1)) ** 0.5 for side, (s, n) in sums.items()}


class SymmetryWatch:
    """Measures the model's symmetries after every ``every``-th optimizer step and at each epoch end (a global
    optimizer step hook, since retune owns the loop), with BLEU at epoch ends, and keeps symmetry.json current."""

    def __init__(self, model: nn.Module, tokenizer, path: Path, head: dict, epsilons: list[float], every: int,
                 per_epoch: int, bleu_pairs: tuple[list[str], list[str]], start: int = 0) -> None:
        self.model, self.tokenizer, self.path, self.head = model, tokenizer, path, head
        self.logger = SymmetryLogger(epsilons, every)
        self.per_epoch, self.bleu_pairs, self.step = per_epoch, bleu_pairs, start
        self.bleu: list[dict] = []
        if start and path.exists():  # resuming: keep what was measured up to the checkpoint
            saved = json.loads(path.read_text())
            self.logger.history = [h for h in saved["history"] if h["step"] <= start]
            self.bleu = [b for b in saved.get("bleu", []) if b["step"] <= start]
        self.units = {name: m.out_features for name, m in model.named_modules() if name.endswith(".fc1")}
        self._handle = None
        self.began = time.perf_counter()  # the seconds of a measurement count from this run's start

    def measure(self) -> None:
        self.logger.measure(self.model, self.step)
        self.logger.history[-1].update(weight_rms(self.model), seconds=round(time.perf_counter() - self.began, 1))
        if self.step % self.per_epoch == 0 and self.step and self.bleu_pairs[0]:
            training = self.model.training
            self.model.eval()
            score = bleu(self.model, self.tokenizer, *self.bleu_pairs)
            self.model.train(training)
            self.bleu.append({"step": self.step, "epoch": self.step // self.per_epoch, "bleu": score})
        h = self.logger.history[-1]
        print(f"symmetry step {self.step} ({h['seconds']:.0f} s): covers "
              + " ".join(f"ε={e:g} {h[f'symmetry/covers@{e:g}']:.0f}" for e in self.logger.epsilons)
              + (f"; BLEU {self.bleu[-1]['bleu']:.2f}" if self.bleu and self.bleu[-1]["step"] == self.step else ""),
              flush=True)
        self.save()

    def save(self) -> None:
        write_json(self.path, self.head, epsilons=list(self.logger.epsilons), every=self.logger.every,
                   steps_per_epoch=self.per_epoch, bleu_sentences=len(self.bleu_pairs[0]), site_units=self.units,
                   history=self.logger.history, bleu=self.bleu)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.step += 1
        if self.step % self.logger.every == 0 or self.step % self.per_epoch == 0:
            self.measure()

    def __enter__(self) -> SymmetryWatch:
        if self.step == 0:
            self.measure()
        self._handle = register_optimizer_step_post_hook(self._after_step)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA), help="folder with {train,val,test_2016_flickr}.{de,en}.gz")
    parser.add_argument("--out", required=True)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--ffn", type=int, help="FFN width (default: d_model, as in the seed)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--patience", type=int, default=3, help="epochs without val improvement before stopping")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--train-limit", type=int, help="use only this many training pairs (smoke tests)")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--max-minutes", type=float, help="stop at the first evaluation after this much wall time")
    parser.add_argument("--bleu-limit", type=int, help="score BLEU on this many test sentences (default: all)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--symmetry-every", type=int, default=0,
                        help="measure fibers/opfibers/covers every N steps and at epoch ends (0: off)")
    parser.add_argument("--symmetry-eps", type=float, nargs="+", default=[0.0, 0.1, 0.15, 0.2, 0.3],
                        help="absolute ε's of the measurements (hf_fibration.research.emergence)")
    parser.add_argument("--symmetry-bleu", type=int, default=200,
                        help="BLEU on this many test_2016 sentences at each epoch end while measuring (0: none)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data, out = Path(args.data), Path(args.out)
    if not (data / "train.de.gz").exists():
        raise SystemExit(f"Multi30k not found in {data}; pass --data.")
    head = print_preamble(command_line(__file__, argv))

    train_src, train_tgt = read_split(data, "train", args.train_limit)
    val_src, val_tgt = read_split(data, "val")
    test_src, test_tgt = read_split(data, "test_2016_flickr", args.bleu_limit)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "vocab.json").exists():
        tokenizer = T.AutoTokenizer.from_pretrained(out)
    else:
        tokenizer = train_marian_tokenizer(train_src + train_tgt, out, vocab_size=args.vocab)
    torch.manual_seed(args.seed)
    model = build_model(tokenizer, args.d_model, args.layers, args.heads, args.ffn)
    train = batches(tokenizer, train_src, train_tgt, args.batch_size, args.max_length)
    val = batches(tokenizer, val_src, val_tgt, args.batch_size, args.max_length)
    print(f"{len(train_src)} train pairs, {len(train.batches)} batches/epoch; {size_text(model)}", flush=True)
    watch = contextlib.nullcontext()
    if args.symmetry_every:
        saved = complete_state(out / STATE_DIR) if args.resume else None
        done = json.loads((saved / "trainer.json").read_text())["step"] if saved is not None else 0
        watch = SymmetryWatch(model, tokenizer, out / "symmetry.json", head, args.symmetry_eps, args.symmetry_every,
                              len(train.batches), (test_src[:args.symmetry_bleu], test_tgt[:args.symmetry_bleu]),
                              start=done)
    start = time.perf_counter()
    with watch:
        result = retune(model, train, val, epochs=args.epochs, learning_rate=args.lr, patience=args.patience,
                        max_steps=args.max_steps, output_dir=out, resume=args.resume, betas=(0.9, 0.98),
                        adam_eps=1e-9, warmup_steps=args.warmup, seed=args.seed, progress=not args.no_progress,
                        max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    seconds = time.perf_counter() - start
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "d_model": args.d_model, "ffn": args.ffn or args.d_model, **parameter_counts(model), "steps": result.steps,
        "epochs": result.epochs, "early_stopped": result.stopped_early, "patience": args.patience,
        "val_loss": evaluate_loss(model, val),
        "test2016_bleu": bleu(model, tokenizer, test_src, test_tgt), "train_seconds_this_run": round(seconds, 1),
        "history": result.history,
    }
    return save_results(out, head, record)


if __name__ == "__main__":
    main()
