"""Eval/train splits through `datasets` (hub names and local files alike) and the task's loss.

Tasks: ``causal`` (next-token loss), ``seq2seq`` (teacher-forced cross-entropy on the target), ``masked``
(MLM loss on a fixed, seeded 15% mask) and ``fidelity`` for bare encoders (1 − cosine between the mean-pooled
outputs of the model and of the uncompressed model, whose base value is 0, so its bound is absolute).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hf_fibration.models.architectures import architecture_for
from hf_fibration.models.surgery import model_type_of

PACKAGE_DATA = Path(__file__).parent.parent / "data"
DEFAULT_TEXT = PACKAGE_DATA / "wikitext2_valid.txt"
DEFAULT_PAIRS = PACKAGE_DATA / "multi30k_val_de_en.jsonl"
FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TASKS = ("causal", "seq2seq", "masked", "fidelity")


class DataError(ValueError):
    """Bad eval/train data: a missing split or column, an empty split, an unreadable file."""


def task_of(model: nn.Module) -> str:
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        return "seq2seq"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    if name.endswith("ForMaskedLM"):
        return "masked"
    return "fidelity"


def load_split(
    dataset: str | None,
    split: str = "validation",
    config_name: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
):
    """A `datasets.Dataset` from a hub name, a local data file or directory (None: the packaged eval text)."""
    import datasets

    if dataset is None:
        dataset, split = str(DEFAULT_TEXT), "train"
    path = Path(dataset)
    try:
        if path.is_file():
            if path.stat().st_size == 0:
                raise DataError(f"The data file {path} is empty; pass a file with examples.")
            builder = FILE_BUILDERS.get("".join(path.suffixes[-1:]).lower())
            if builder is None:
                raise DataError(f"Cannot read {path}: use a .txt, .json, .jsonl, .csv or .parquet file.")
            ds = _load_file(datasets, builder, path)
        else:
            ds = datasets.load_dataset(dataset, config_name, split=split)
    except DataError:
        raise
    except ValueError as err:
        raise DataError(f"Split {split!r} of {dataset!r} could not be loaded ({_first_line(err)}); "
                        "pass --split with one of the dataset's splits.") from None
    except (FileNotFoundError, ConnectionError, OSError, StopIteration) as err:
        raise DataError(f"Dataset {dataset!r} not found locally and the Hub is unreachable "
                        f"({_first_line(err)}); pass a local file or an available dataset.") from None
    if len(ds) == 0:
        raise DataError(f"The split {split!r} of {dataset!r} is empty; choose a split with examples.")
    if max_samples is not None and len(ds) > max_samples:
        ds = ds.shuffle(seed=seed).select(range(max_samples))
    return ds


# What a file of each kind must look like, for the one-line error when it does not parse.
FILE_FORMATS = {"text": "UTF-8 text, one example a line", "json": "JSON Lines (one JSON object a line, UTF-8) or "
                "one JSON array of objects", "csv": "UTF-8 CSV with a header row (quote fields holding commas)",
                "parquet": "a Parquet file (re-write it, e.g. with pandas.DataFrame.to_parquet)"}


def _load_file(datasets, builder: str, path: Path):
    """One local data file through `datasets`; a file that does not parse is a one-line DataError naming why."""
    if builder != "parquet":
        with path.open("rb") as f:
            if b"\x00" in f.read(1 << 16):
                raise DataError(f"{path} looks binary (it holds NUL bytes); pass {FILE_FORMATS[builder]}.")
    quiet = logging.getLogger("datasets")  # its builders log the parse error with a traceback; ours is one line
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err.__context__ or err
        while (cause.__cause__ or cause.__context__) is not None and not isinstance(cause, UnicodeDecodeError):
            cause = cause.__cause__ or cause.__context__
        what = "is not UTF-8" if isinstance(cause, UnicodeDecodeError) else "does not parse"
        raise DataError(f"{path} {what} ({_first_line(cause)[:120]}); pass {FILE_FORMATS[builder]}.") from None
    finally:
        quiet.setLevel(level)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


def _column(ds, name: str | None, candidates: tuple[str, ...], what: str) -> str:
    if name is not None:
        if name not in ds.column_names:
            raise DataError(f"Column {name!r} not in the data (columns: {', '.join(ds.column_names)}); "
                            f"pass --{what}-column.")
        return name
    for cand in candidates:
        if cand in ds.column_names:
            return cand
    raise DataError(f"No {what} column found among {', '.join(ds.column_names)}; pass --{what}-column.")


@dataclass
class EvalSet:
    """Tokenized, padded batches fixed once, with the number of loss terms each contributes."""

    task: str
    batches: list[dict[str, torch.Tensor]]
    weights: list[int]
    reference: list[torch.Tensor] = field(default_factory=list)  # fidelity: the uncompressed embeddings

    @property
    def total_weight(self) -> int:
        return sum(self.weights)

    @property
    def num_examples(self) -> int:
        return sum(len(b["input_ids"]) for b in self.batches)

    def head(self, batches: int) -> EvalSet:
        """The first ``batches`` batches (with their reference embeddings, for the fidelity task)."""
        return EvalSet(self.task, self.batches[:batches], self.weights[:batches], self.reference[:batches])

    def split(self, fraction: float, seed: int = 0) -> tuple[EvalSet, EvalSet]:
        """(search, held-out): a seeded ``fraction`` of the examples, at least one on each side, held out.

        Batches are split row-wise, so both parts keep the batch boundaries (and padding) they had."""
        n = self.num_examples
        if n < 2:
            raise DataError(f"A held-out split needs at least 2 eval examples, got {n}; pass more eval data.")
        count = min(max(round(fraction * n), 1), n - 1)
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]] = True
        parts: tuple[EvalSet, EvalSet] = (EvalSet(self.task, [], []), EvalSet(self.task, [], []))
        start = 0
        for i, batch in enumerate(self.batches):
            rows = len(batch["input_ids"])
            held = chosen[start:start + rows]
            start += rows
            for part, mask in zip(parts, (~held, held), strict=True):
                if not bool(mask.any()):
                    continue
                sub = {k: v[mask.to(v.device)] for k, v in batch.items()}
                part.batches.append(sub)
                part.weights.append(loss_terms(self.task, sub))
                if self.reference:
                    part.reference.append(self.reference[i][mask.to(self.reference[i].device)])
        return parts

    def to(self, device: torch.device | str) -> EvalSet:
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in self.batches]
        self.reference = [r.to(device) for r in self.reference]
        return self


def build_eval_set(
    model: nn.Module,
    tokenizer,
    ds=None,
    *,
    text_column: str | None = None,
    source_column: str | None = None,
    target_column: str | None = None,
    batch_size: int = 16,
    max_length: int = 128,
    seed: int = 0,
    task: str | None = None,
    max_samples: int = 256,
) -> EvalSet:
    """Tokenize ``ds`` for the model's task (None: ``max_samples`` of the packaged data for that task)."""
    task = task or task_of(model)
    if ds is None:
        ds = load_split(str(DEFAULT_PAIRS if task == "seq2seq" else DEFAULT_TEXT), max_samples=max_samples, seed=seed)
    batches, weights = [], []
    if task == "seq2seq":
        src = _column(ds, source_column, ("de", "source", "src", "translation_source"), "source")
        tgt = _column(ds, target_column, ("en", "target", "tgt", "translation_target"), "target")
        texts = [(s, t) for s, t in zip(ds[src], ds[tgt], strict=True) if s and t]
    else:
        col = _column(ds, text_column, ("text", "sentence", "content"), "text")
        texts = [t for t in ds[col] if t and t.strip()]
    if not texts:
        raise DataError("The eval data has no non-empty examples; check the split and the column.")
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        if task == "seq2seq":
            enc = tokenizer([s for s, _ in chunk], text_target=[t for _, t in chunk], padding=True,
                            truncation=True, max_length=max_length, return_tensors="pt")
            enc["labels"] = enc["labels"].masked_fill(enc["labels"] == tokenizer.pad_token_id, -100)
            weight = int((enc["labels"] != -100).sum())
        else:
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            enc, weight = _labels(task, enc, tokenizer, gen)
        batches.append(dict(enc))
        weights.append(weight)
    evalset = EvalSet(task, batches, weights)
    if task == "fidelity":
        with torch.no_grad():
            evalset.reference = [embed(model, b) for b in batches]
    return evalset


def loss_terms(task: str, batch: dict[str, torch.Tensor]) -> int:
    """How many terms the batch's mean loss averages over (its weight in the eval set's mean)."""
    if task == "fidelity":
        return int(batch["input_ids"].shape[0])
    labels = batch["labels"]
    return int((labels[:, 1:] != -100).sum()) if task == "causal" else int((labels != -100).sum())


def _labels(task: str, enc, tokenizer, gen: torch.Generator):
    mask = enc["attention_mask"].bool()
    if task == "causal":
        labels = enc["input_ids"].masked_fill(~mask, -100)
        enc["labels"] = labels
        return enc, int((labels[:, 1:] != -100).sum())
    if task == "masked":
        special = torch.zeros_like(mask)
        for tid in tokenizer.all_special_ids:
            special |= enc["input_ids"] == tid
        pick = (torch.rand(mask.shape, generator=gen) < 0.15) & mask & ~special
        labels = enc["input_ids"].masked_fill(~pick, -100)
        enc["input_ids"] = enc["input_ids"].masked_fill(pick, tokenizer.mask_token_id)
        enc["labels"] = labels
        return enc, int(pick.sum())
    return enc, int(enc["input_ids"].shape[0])


def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled, normalized last hidden state (the sentence-embedding recipe of MiniLM and friends).

    Runs with gradients when they are enabled (fidelity retuning); the reference is computed under no_grad."""
    return pool(model(**encoder_inputs(batch)), batch)


def encoder_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def cosine_gap(pooled: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per example, 1 − cosine between normalized embeddings (the fidelity loss), never below 0."""
    return (1.0 - (pooled * reference).sum(-1)).clamp_min(0.0)


def pool(out, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The normalized mean over the attended positions of a model output's last hidden state."""
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return nn.functional.normalize(pooled, dim=-1)


def task_loss(model: nn.Module, evalset: EvalSet, index: int) -> torch.Tensor:
    """The batch's mean loss as a tensor (differentiable: retuning trains on it)."""
    batch = evalset.batches[index]
    if evalset.task == "fidelity":
        return cosine_gap(embed(model, batch), evalset.reference[index]).mean()
    out = model(**batch, use_cache=False) if evalset.task in ("causal", "seq2seq") else model(**batch)
    return out.loss


@torch.no_grad()
def batch_loss_sum(model: nn.Module, evalset: EvalSet, index: int) -> float:
    """Sum of the batch's loss terms (mean loss × its weight), so the running total bounds the final mean."""
    if evalset.weights[index] == 0:
        return 0.0
    if _reads_head(model, evalset.task):
        return float(_token_terms(model, evalset, index).sum(dtype=torch.float64))
    return float(task_loss(model, evalset, index)) * evalset.weights[index]


@torch.no_grad()
def batch_example_losses(model: nn.Module, evalset: EvalSet, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example of batch ``index``: the sum of its loss terms and their count (float64, on the CPU)."""
    batch = evalset.batches[index]
    if evalset.task == "fidelity":
        sums = cosine_gap(embed(model, batch), evalset.reference[index]).double().cpu()
        return sums, torch.ones_like(sums)
    terms = _token_terms(model, evalset, index)
    return terms.sum(1, dtype=torch.float64).cpu(), (_targets(evalset.task, batch) != -100).sum(1).double().cpu()


HEAD_CHUNK_TOKENS = 128  # the head's logits are formed this many tokens at a time (chunk × vocabulary floats)


class _HeadInput(Exception):
    """Raised by the head's pre-hook: the forward stops with the final hidden states in hand."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


def _reads_head(model: nn.Module, task: str) -> bool:
    """Whether the task's loss is a cross-entropy of the output embeddings' output (a causal or masked LM whose
    table row says ``head_logits``), so that it can read the head on the labelled tokens only, a chunk at a time,
    instead of the batch's whole logits."""
    if task not in ("causal", "masked"):
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return False
    try:
        return architecture_for(model_type_of(model)).head_logits
    except ValueError:
        return False


def _targets(task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each position's target (−100: none); a causal position t predicts t + 1, the last predicts nothing."""
    labels = batch["labels"]
    if task == "causal":
        return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
    return labels


def _token_terms(model: nn.Module, evalset: EvalSet, index: int) -> torch.Tensor:
    """The cross-entropy of every position of batch ``index`` (0 where there is no target), float32."""
    batch = evalset.batches[index]
    targets = _targets(evalset.task, batch)
    kwargs = {"use_cache": False} if evalset.task in ("causal", "seq2seq") else {}
    if not _reads_head(model, evalset.task):
        logits = model(**batch, **kwargs).logits
        # classes on the last, contiguous axis: over a large vocabulary 2-3× faster than the (N, C, L) layout
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                           ignore_index=-100, reduction="none").view(targets.shape)
    head = model.get_output_embeddings()

    def stop(module: nn.Module, args: tuple) -> None:
        raise _HeadInput(args[0])

    handle = head.register_forward_pre_hook(stop)
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"}, **kwargs)
        raise RuntimeError("The model's forward never reached its output embeddings.")
    except _HeadInput as reached:
        hidden = reached.hidden
    finally:
        handle.remove()
    labelled = targets != -100
    rows, wanted = hidden[labelled.to(hidden.device)], targets[labelled].to(hidden.device)
    parts = [nn.functional.cross_entropy(head(rows[i:i + HEAD_CHUNK_TOKENS]).float(), wanted[i:i + HEAD_CHUNK_TOKENS],
                                         reduction="none") for i in range(0, rows.shape[0], HEAD_CHUNK_TOKENS)]
    terms = torch.zeros(targets.shape, dtype=torch.float32)
    if parts:
        terms[labelled] = torch.cat(parts).cpu()
    return terms


def example_losses(model: nn.Module, evalset: EvalSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the sum of its loss terms and their count (Σ sums / Σ counts is ``evaluate_loss``)."""
    examples: list[tuple[torch.Tensor, torch.Tensor]] = []
    evaluate_loss(model, evalset, examples=examples)
    return join_examples(examples)


def join_examples(examples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([s for s, _ in examples]), torch.cat([c for _, c in examples])


def examples_loss(examples: list[tuple[torch.Tensor, torch.Tensor]], evalset: EvalSet) -> float:
    """The eval loss of ``evalset`` from each of its batches' per-example terms (``evaluate_loss(..., examples=)``
    gives them; summed as it sums them)."""
    return sum(float(sums.sum()) for sums, _ in examples) / evalset.total_weight


def loss_increase(base: tuple[torch.Tensor, torch.Tensor], now: tuple[torch.Tensor, torch.Tensor]
                  ) -> tuple[float, float]:
    """Mean loss increase from ``base`` to ``now`` on the same examples, and its standard error (examples as the
    sampling unit: tokens of one example are not independent)."""
    diff, counts = now[0] - base[0], base[1]
    total = float(counts.sum())
    se = float(diff.std() * len(diff) ** 0.5) / total if len(diff) > 1 else float("inf")
    return float(diff.sum()) / total, se


def evaluate_loss(
    model: nn.Module,
    evalset: EvalSet,
    bound: float | None = None,
    before_batch: Callable[[int], None] | None = None,
    examples: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> float:
    """Mean loss over the eval set; with ``bound``, returns early (a value > bound) once it must exceed it. With
    ``examples`` (a list), each batch's per-example terms (``batch_example_losses``) are appended to it."""
    total = 0.0
    budget = None if bound is None else bound * evalset.total_weight
    was_training = model.training
    model.eval()
    try:
        for i in range(len(evalset.batches)):
            if before_batch is not None:
                before_batch(i)
            if examples is None:
                total += batch_loss_sum(model, evalset, i)
            else:
                examples.append(batch_example_losses(model, evalset, i))
                total += float(examples[-1][0].sum())  # as ``examples_loss`` sums them
            if budget is not None and total > budget:
                return total / evalset.total_weight  # every term is ≥ 0: the final mean can only be larger
    finally:
        model.train(was_training)
    return total / evalset.total_weight
