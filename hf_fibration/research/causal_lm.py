"""The text of the small causal LMs (scripts/train_lm.py, scaling_law.py, bench_pretrained.py,
target_distill_lm.py): the default corpus, its train/validation split and contiguous token blocks."""

from __future__ import annotations

from pathlib import Path

import torch

from hf_fibration.evaluation.evalset import EvalSet

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def split_text(path: Path, val_fraction: float = 0.1) -> tuple[str, str]:
    """(train, validation) text of ``path``, cut at the line break before the last ``val_fraction``."""
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * (1 - val_fraction))
    cut = text.rfind("\n", 0, cut) + 1 or cut
    return text[:cut], text[cut:]


def blocks(tokenizer, text: str, block: int, batch_size: int, limit: int | None = None) -> EvalSet:
    """Contiguous ``block``-token windows of ``text`` batched for next-token loss (every position counts)."""
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    n = len(ids) // block
    windows = ids[: n * block].view(n, block)[:limit]
    out, weights = [], []
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size]
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})
        weights.append(x.shape[0] * (block - 1))
    return EvalSet("causal", out, weights)
