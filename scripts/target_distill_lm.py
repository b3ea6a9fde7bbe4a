"""Ask for a size, then distill: the small causal LMs trained by ``scripts/train_lm.py`` at 2× and 3× fewer
non-embedding parameters, fibration against FLAP and Wanda-sp at exactly the same size, the same KL retuning.

    python scripts/target_distill_lm.py --models runs/lm-llama-d128 runs/scaling/gpt2-d128 --keeps 0.5 0.333

Data: the model's own text file split as in training (first 90% train, last 10% validation). Calibration/search
blocks and retuning blocks come from the training text (disjoint windows); the reported loss is on every
validation block, which neither the compression nor the retuning saw. ``--methods none`` adds the control: the
uncompressed model retuned the same way (these models are small and briefly trained, so retuning alone moves them).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
import transformers as T

import hf_fibration  # noqa: F401  (registers the compressed-checkpoint loader)
from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.evaluation.evalset import EvalSet, evaluate_loss
from hf_fibration.evaluation.results_io import command_line, preamble_markdown, print_preamble, write_rows
from hf_fibration.methods.baselines import compress_to_size
from hf_fibration.models.surgery import non_embedding_parameters
from hf_fibration.research.causal_lm import SHAKESPEARE, split_text
from hf_fibration.training.retune import retune


def windows(tokenizer, text: str, block: int) -> torch.Tensor:
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    n = len(ids) // block
    return ids[: n * block].view(n, block)


def evalset(rows: torch.Tensor, batch_size: int) -> EvalSet:
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
               for x in rows.split(batch_size)]
    return EvalSet("causal", batches, [b["input_ids"].numel() - len(b["input_ids"]) for b in batches])


def compress(method: str, teacher, calib: EvalSet, keep: float) -> torch.nn.Module:
    model = copy.deepcopy(teacher)
    if method == "none":  # the control: the uncompressed model, retuned the same way
        return model
    if method == "fibration":
        config = FibrationConfig(target_params=keep, parts=("attention", "mlp"))
        compress_pretrained(model, config, evalset=calib, progress=False)
    else:
        compress_to_size(model, method, keep, calib)
    return model


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="directories written by scripts/train_lm.py")
    ap.add_argument("--methods", nargs="+", default=["fibration", "flap", "wanda-sp"])
    ap.add_argument("--keeps", nargs="+", type=float, default=[0.5, 1 / 3])
    ap.add_argument("--data", default=str(SHAKESPEARE))
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--calib", type=int, default=64, help="calibration/search blocks (training text)")
    ap.add_argument("--steps", type=int, default=300, help="distillation steps, the same for every method")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--stop-blocks", type=int, default=32, help="early-stopping blocks (training text)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/target_distill/lm")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    head = print_preamble(command_line(__file__, argv))
    train_text, val_text = split_text(Path(args.data))
    rows_path = Path(args.out) / "rows.json"
    rows = json.loads(rows_path.read_text())["rows"] if rows_path.exists() else []
    for directory in args.models:
        teacher = T.AutoModelForCausalLM.from_pretrained(directory).eval()
        tok = T.AutoTokenizer.from_pretrained(directory)
        train_rows = windows(tok, train_text, args.block)
        order = list(range(len(train_rows)))
        random.Random(0).shuffle(order)
        calib = evalset(train_rows[order[:args.calib]], args.batch_size)
        stop = evalset(train_rows[order[args.calib:args.calib + args.stop_blocks]], args.batch_size)
        train = evalset(train_rows[order[args.calib + args.stop_blocks:]], args.batch_size)
        val = evalset(windows(tok, val_text, args.block), args.batch_size)
        base = evaluate_loss(teacher, val)
        before = non_embedding_parameters(teacher)
        for keep in args.keeps:
            for method in args.methods:
                if method == "none" and keep != args.keeps[0]:
                    continue
                name = Path(directory).name
                if any(r["model"] == name and r["keep"] == round(keep, 3) and r["method"] == method for r in rows):
                    continue
                start = time.perf_counter()
                model = compress(method, teacher, calib, keep)
                row = {"model": name, "method": method, "keep": round(keep, 3), "val_base": base,
                       "compress_seconds": time.perf_counter() - start,
                       "non_embedding_kept": non_embedding_parameters(model) / before,
                       "val_compressed": evaluate_loss(model, val)}
                model.requires_grad_(True)
                start = time.perf_counter()
                retune(model, train, stop, epochs=1000, max_steps=args.steps, learning_rate=args.lr, patience=1000,
                       eval_every=50, warmup_steps=20, schedule="cosine", progress=False, teacher=teacher,
                       distill_weight=0.5, distill_temperature=2.0)
                row.update(retune_seconds=time.perf_counter() - start, val_retuned=evaluate_loss(model, val))
                print(json.dumps(row), flush=True)
                rows.append(row)
                write_rows(args.out, rows, head)
                _table(Path(args.out), rows, head, args)
    return rows


def _table(out: Path, rows: list[dict], head: dict, args: argparse.Namespace) -> None:
    lines = ["| model | kept | method | val loss base | compressed | after distillation | compress s | retune s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['non_embedding_kept']:.3f} | {r['method']} | {r['val_base']:.4f} | "
              f"{r['val_compressed']:.4f} | {r['val_retuned']:.4f} | {r['compress_seconds']:.0f} | "
              f"{r['retune_seconds']:.0f} |" for r in rows]
    (out / "results.md").write_text(
        "# Small causal LMs at a target size, then KL distillation\n\n" + preamble_markdown(head) +
        f"\nCalibration/search: {args.calib} training-text blocks of {args.block} tokens; retuning: {args.steps} "
        "steps of 0.5·task + 0.5·KL(teacher‖student)·T² (T = 2) on other training-text blocks; loss reported on "
        "every validation block (the last 10% of the text), which neither saw.\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
