"""Multi30k de→en as the translation scripts use it (train_multi30k.py, multi30k_series.py, multi30k_compress.py,
bench_pretrained.py, bench_block_search.py, seed_regime.py): the gzipped splits, teacher-forced batches, and the
Marian model of the seed's setup."""

from __future__ import annotations

import gzip
from pathlib import Path

import transformers as T

from hf_fibration.evaluation.evalset import EvalSet

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "multi30k"


def read_split(data: Path, split: str, limit: int | None = None) -> tuple[list[str], list[str]]:
    """(German, English) sentences of ``{split}.{de,en}.gz`` in ``data``: pairs with an empty side dropped, then the
    first ``limit``."""

    def lines(lang: str) -> list[str]:
        with gzip.open(data / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
            return [line.strip() for line in f]

    de, en = lines("de"), lines("en")
    pairs = [(d, e) for d, e in zip(de, en, strict=True) if d and e][:limit]
    return [d for d, _ in pairs], [e for _, e in pairs]


def batches(tokenizer, sources: list[str], targets: list[str], batch_size: int, max_length: int) -> EvalSet:
    """Consecutive batches of tokenized pairs with padded labels masked (-100), weighted by their target tokens."""
    out, weights = [], []
    for i in range(0, len(sources), batch_size):
        enc = tokenizer(sources[i:i + batch_size], text_target=targets[i:i + batch_size], padding=True,
                        truncation=True, max_length=max_length, return_tensors="pt")
        enc["labels"] = enc["labels"].masked_fill(enc["labels"] == tokenizer.pad_token_id, -100)
        out.append(dict(enc))
        weights.append(int((enc["labels"] != -100).sum()))
    return EvalSet("seq2seq", out, weights)


def build_model(tokenizer, d_model: int, layers: int, heads: int, ffn: int | None) -> T.MarianMTModel:
    """A freshly initialized Marian model: ``layers``+``layers`` ReLU blocks, FFN width ``ffn`` (default
    ``d_model``), shared embeddings, dropout 0.1."""
    config = T.MarianConfig(
        vocab_size=len(tokenizer), d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn or d_model,
        decoder_ffn_dim=ffn or d_model, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
        forced_eos_token_id=tokenizer.eos_token_id, activation_function="relu", dropout=0.1, num_beams=1,
        max_length=64, share_encoder_decoder_embeddings=True, scale_embedding=True,
    )
    return T.MarianMTModel(config)
