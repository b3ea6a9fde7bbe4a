"""One table of where things live in each supported family. Adding a family means adding a row.

Names are relative to a transformer block, which is found by ``block_pattern`` (a regex on module names), so
the same row serves every head class of a family (``BertModel``, ``BertForMaskedLM``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN


@dataclass(frozen=True)
class AttentionSpec:
    projections: tuple[str, ...]  # q/k/v (or one fused qkv) inside the block
    out: str  # the projection that writes into the residual stream
    fused_width: str | None = None  # fused qkv: the attention module's attribute holding each part's width


@dataclass(frozen=True)
class MlpSpec:
    inputs: tuple[str, ...]  # fc1, or (gate, up): one unit is the tuple of their rows
    out: str  # fc2 / down: writes into the residual stream


@dataclass(frozen=True)
class Architecture:
    family: str
    model_types: tuple[str, ...]
    block_pattern: str
    attentions: tuple[AttentionSpec, ...]
    mlp: MlpSpec
    rotary: bool = False
    transposed_weights: bool = False  # GPT-2's Conv1D stores (in, out)
    activation: str = "hidden_act"  # the config attribute naming the MLP activation (a transformers ACT2FN key)
    head_logits: bool = False  # the output embeddings' output is the logits (no bias or scale added after it)

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        pattern = re.compile(self.block_pattern)
        return [(name, m) for name, m in model.named_modules() if pattern.search(name)]


_SEQ2SEQ_ATTENTION = (
    AttentionSpec(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.out_proj"),
    AttentionSpec(("encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj"), "encoder_attn.out_proj"),
)
_LLAMA_ATTENTION = (AttentionSpec(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj"),)
_GATED_MLP = MlpSpec(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("marian", ("marian",), r"(?:^|\.)(?:encoder|decoder)\.layers\.\d+$", _SEQ2SEQ_ATTENTION,
                 MlpSpec(("fc1",), "fc2"), activation="activation_function"),
    Architecture("bart", ("bart", "mbart"), r"(?:^|\.)(?:encoder|decoder)\.layers\.\d+$", _SEQ2SEQ_ATTENTION,
                 MlpSpec(("fc1",), "fc2"), activation="activation_function"),
    Architecture("bert", ("bert",), r"(?:^|\.)encoder\.layer\.\d+$",
                 (AttentionSpec(("attention.self.query", "attention.self.key", "attention.self.value"),
                                "attention.output.dense"),),
                 MlpSpec(("intermediate.dense",), "output.dense"), head_logits=True),
    Architecture("gpt2", ("gpt2",), r"(?:^|\.)h\.\d+$",
                 (AttentionSpec(("attn.c_attn",), "attn.c_proj", fused_width="split_size"),),
                 MlpSpec(("mlp.c_fc",), "mlp.c_proj"), transposed_weights=True, activation="activation_function",
                 head_logits=True),
    Architecture("llama", ("llama", "qwen2", "mistral"), r"(?:^|\.)layers\.\d+$", _LLAMA_ATTENTION, _GATED_MLP,
                 rotary=True, head_logits=True),
)

SUPPORTED_MODEL_TYPES = tuple(t for a in ARCHITECTURES for t in a.model_types)


def architecture_for(model_type: str) -> Architecture:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise ValueError(
        f"Unsupported architecture {model_type!r}; hf-fibration supports {', '.join(SUPPORTED_MODEL_TYPES)}."
    )


def mlp_activation(model: nn.Module) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """(name, σ) of the model's MLP activation: the config attribute its family's row names, σ from ACT2FN."""
    config = getattr(model, "config", None)
    arch = architecture_for(getattr(config, "model_type", None))
    name = getattr(config, arch.activation, None)
    if not isinstance(name, str) or name not in ACT2FN:
        raise ValueError(f"Cannot tell the MLP activation of this {arch.family} model (config.{arch.activation} = "
                         f"{name!r}); set it to one of transformers' ACT2FN names.")
    return name, ACT2FN[name]
