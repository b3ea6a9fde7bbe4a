"""Quality numbers for a (compressed) model: loss, perplexity, BLEU (sacrebleu, which `evaluate` wraps)."""

from __future__ import annotations

import math

import torch
from torch import nn

from hf_fibration.evaluation.evalset import EvalSet, evaluate_loss


@torch.no_grad()
def translate(model: nn.Module, tokenizer, sources: list[str], batch_size: int = 32, max_new_tokens: int = 64,
              num_beams: int = 1) -> list[str]:
    device = next(model.parameters()).device
    out: list[str] = []
    for i in range(0, len(sources), batch_size):
        enc = tokenizer(sources[i:i + batch_size], padding=True, truncation=True, max_length=128,
                        return_tensors="pt").to(device)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        out += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return out


def bleu(model: nn.Module, tokenizer, sources: list[str], references: list[str], **kwargs) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(translate(model, tokenizer, sources, **kwargs), [references]).score)


def quality(model: nn.Module, evalset: EvalSet, tokenizer=None, pairs: tuple[list[str], list[str]] | None = None,
            loss: float | None = None, examples: list | None = None) -> dict[str, float]:
    """Eval loss, plus perplexity for language models and BLEU for translation (when ``pairs`` is given).

    ``loss``: the eval loss when it was just measured on ``evalset`` (saves an evaluation). ``examples`` (a list):
    receives the per-example loss terms of that evaluation (``evaluate_loss``), for a caller that needs them too."""
    loss = evaluate_loss(model, evalset, examples=examples) if loss is None else float(loss)
    result = {"loss": loss}
    if evalset.task in ("causal", "masked", "seq2seq"):
        result["perplexity"] = math.exp(min(loss, 50.0))
    if pairs is not None and tokenizer is not None:
        result["bleu"] = bleu(model, tokenizer, *pairs)
    return result
