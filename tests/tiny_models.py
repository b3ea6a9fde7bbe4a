"""Tiny random models of every supported family, built locally, and a planter of exact fibers."""

from __future__ import annotations

import torch
import transformers as T

from hf_fibration import FibrationConfig
from hf_fibration.models.sites import build_sites
from hf_fibration.models.surgery import get_module

VOCAB = 64


def _seq2seq(config_cls, layers=2, **kw):
    return config_cls(vocab_size=VOCAB, d_model=32, encoder_layers=layers, decoder_layers=layers,
                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      decoder_start_token_id=0, **kw)


def _decoder(config_cls, layers=2, **kw):
    return config_cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, **kw)


FAMILIES = {
    "marian": lambda layers=2: T.MarianMTModel(_seq2seq(T.MarianConfig, layers)),
    "bart": lambda layers=2: T.BartForConditionalGeneration(_seq2seq(T.BartConfig, layers)),
    "bert": lambda layers=2: T.BertForMaskedLM(T.BertConfig(vocab_size=VOCAB, hidden_size=32,
                                                            num_hidden_layers=layers, num_attention_heads=4,
                                                            intermediate_size=64, max_position_embeddings=64)),
    "gpt2": lambda layers=2: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4,
                                                            n_positions=64, bos_token_id=1, eos_token_id=2)),
    "llama": lambda layers=2: T.LlamaForCausalLM(_decoder(T.LlamaConfig, layers, tie_word_embeddings=False)),
    "qwen2": lambda layers=2: T.Qwen2ForCausalLM(_decoder(T.Qwen2Config, layers, tie_word_embeddings=True)),
    "mistral": lambda layers=2: T.MistralForCausalLM(_decoder(T.MistralConfig, layers)),
}
AUTO_CLASSES = {
    "marian": T.AutoModelForSeq2SeqLM, "bart": T.AutoModelForSeq2SeqLM, "bert": T.AutoModelForMaskedLM,
    "gpt2": T.AutoModelForCausalLM, "llama": T.AutoModelForCausalLM, "qwen2": T.AutoModelForCausalLM,
    "mistral": T.AutoModelForCausalLM,
}
GENERATES = ("marian", "bart", "gpt2", "llama", "qwen2", "mistral")


def tiny_model(family: str, seed: int = 0, layers: int = 2) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    return FAMILIES[family](layers).eval()


def inputs(model: T.PreTrainedModel, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, VOCAB, (2, 6), generator=g)}
    return {"input_ids": ids}


def _rows(module: torch.nn.Module) -> torch.Tensor:
    """A writable (out, in) view of a Linear's or Conv1D's weight."""
    return module.weight if isinstance(module, torch.nn.Linear) else module.weight.T


@torch.no_grad()
def plant_fibers(model: T.PreTrainedModel, noise: float = 0.0) -> int:
    """Copy a quarter of each site's unit rows onto other units, so ε = 0 finds exact fibers; returns copies.

    With ``noise`` the copies get relative Gaussian noise: near-fibers that only ε > 0 merges."""
    copies = 0
    g = torch.Generator().manual_seed(0)

    def jitter(t: torch.Tensor) -> torch.Tensor:
        return t if noise == 0 else t + noise * t.abs().mean() * torch.randn(t.shape, generator=g)

    for site in build_sites(model, FibrationConfig(epsilon=0.0)):
        if site.kind == "embedding":
            table = model.get_input_embeddings().weight
            n = table.shape[1]
            table[:, n // 2: n // 2 + n // 4] = jitter(table[:, : n // 4])
            copies += n // 4
            continue
        for name in site.modules_in():
            module = get_module(model, name)
            rows = _rows(module)
            n = rows.shape[0]
            rows[n // 2: n // 2 + n // 4] = jitter(rows[: n // 4].clone())
            if module.bias is not None:
                module.bias[n // 2: n // 2 + n // 4] = module.bias[: n // 4].clone()
        copies += n // 4
    return copies
