"""Module surgery on a transformers model, with nothing of the compressor: find, swap and read modules, count
parameters."""

from __future__ import annotations

import torch
from torch import nn

from hf_fibration.core.embedding import FiberEmbedding, FiberInputLinear
from hf_fibration.core.modules import FiberLinear

FIBER_MODULES = (FiberLinear, FiberEmbedding, FiberInputLinear)


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, in) weight and bias of an nn.Linear or a GPT-2 style Conv1D, detached."""
    if isinstance(module, nn.Linear):
        weight = module.weight.detach()
    elif hasattr(module, "nf") and module.weight.dim() == 2:  # transformers.pytorch_utils.Conv1D
        weight = module.weight.detach().T
    else:
        raise TypeError(f"Cannot read a linear weight from {type(module).__name__}.")
    bias = None if module.bias is None else module.bias.detach()
    return weight, bias


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("compress_pretrained takes a transformers PreTrainedModel; use compress_sequential for "
                        "plain torch models.")
    return config.model_type


def non_embedding_parameters(model: nn.Module) -> int:
    """Parameters outside the embedding tables (token, position, type) and the tied/untied LM head."""
    skip = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            skip.update(id(p) for p in m.parameters())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        skip.update(id(p) for p in head.parameters())
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
