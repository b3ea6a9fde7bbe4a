"""Train a shared sentencepiece vocabulary and save it as a MarianTokenizer directory (for models we train)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

UNK, EOS, PAD = "<unk>", "</s>", "<pad>"


def train_marian_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 8000):
    """Train one sentencepiece model on ``texts`` (both languages) and write source.spm, target.spm, vocab.json.

    Ids: <unk>=0, </s>=1, <pad>=2 (Marian decodes from <pad>). Returns the loaded ``MarianTokenizer``.
    """
    import sentencepiece as spm
    from transformers import MarianTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        unk_id=0, eos_id=1, pad_id=2, bos_id=-1, unk_piece=UNK, eos_piece=EOS, pad_piece=PAD,
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )
    for name in ("source.spm", "target.spm"):
        (out / name).write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    (out / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tokenizer = MarianTokenizer(str(out / "source.spm"), str(out / "target.spm"), str(out / "vocab.json"),
                                unk_token=UNK, eos_token=EOS, pad_token=PAD, model_max_length=256)
    tokenizer.save_pretrained(out)
    return tokenizer
