"""The shapes of a compressed model's modules: recorded in the checkpoint's quantization_config when it is saved,
rebuilt as empty modules before its weights load. Needs the architecture table and module surgery, never the
compressor."""

from __future__ import annotations

import torch
from torch import nn

from hf_fibration.core.embedding import FiberEmbedding, FiberInputLinear
from hf_fibration.core.modules import FiberLinear
from hf_fibration.models.architectures import SUPPORTED_MODEL_TYPES, architecture_for
from hf_fibration.models.surgery import get_module, set_module


def fiber_module_specs(model: nn.Module) -> dict[str, dict]:
    """Shapes of every compressed module, by every name it is reachable under (tied modules share one spec)."""
    specs: dict[str, dict] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, FiberEmbedding):
            specs[name] = {"kind": "embedding", "num_embeddings": m.num_embeddings, "num_fibers": m.embedding_dim,
                           "full_width": m.full_width, "padding_idx": m.padding_idx, "embed_scale": m.embed_scale,
                           "fiber_index": m.fiber_index.tolist()}
        elif isinstance(m, FiberInputLinear):
            specs[name] = {"kind": "input_linear", "full_width": m.full_width, "out_features": m.out_features,
                           "num_fibers": m.in_features, "bias": m.bias is not None,
                           "fiber_index": m.fiber_index.tolist()}
        elif isinstance(m, FiberLinear):
            specs[name] = {"kind": "linear", "in_features": m.in_features, "out_features": m.out_features,
                           "bias": m.bias is not None, "full_width": m.full_width}
    return specs


def build_fiber_modules(model: nn.Module, specs: dict[str, dict]) -> None:
    """Swap in empty modules of the saved shapes (before the weights load); aliases get one shared object."""
    built: dict[str, nn.Module] = {}
    for name, spec in specs.items():
        old = get_module(model, name)
        param = next(old.parameters(), None)
        device = param.device if param is not None else None
        dtype = param.dtype if param is not None else None
        key = repr(sorted(spec.items())) + str(id(old))
        if key not in built:
            built[key] = _empty_module(spec, device, dtype)
        set_module(model, name, built[key])
    sync_fused_widths(model)


def sync_fused_widths(model: nn.Module) -> None:
    """Tell each attention with a fused q/k/v projection the width of each part, which head pruning narrows
    (GPT-2 splits ``c_attn``'s output at ``split_size``); run after compression and when a checkpoint loads."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return
    arch = architecture_for(model_type)
    for block_name, _ in arch.blocks(model):
        for attn in arch.attentions:
            if attn.fused_width is None:
                continue
            (proj,) = attn.projections
            fused = get_module(model, f"{block_name}.{proj}")
            if isinstance(fused, FiberLinear):
                owner = get_module(model, f"{block_name}.{proj.rpartition('.')[0]}")
                setattr(owner, attn.fused_width, fused.output_width // 3)


def restore_fiber_indices(model: nn.Module, specs: dict[str, dict]) -> None:
    """Set the (non-persistent) fiber indices of embeddings and tied heads from the saved specs."""
    for name, spec in specs.items():
        if "fiber_index" in spec:
            module = get_module(model, name)
            module.fiber_index = torch.tensor(spec["fiber_index"], dtype=torch.long, device=module.weight.device)


def _empty_module(spec: dict, device: torch.device | None, dtype: torch.dtype | None) -> nn.Module:
    kind = spec["kind"]
    if kind == "linear":
        return FiberLinear(spec["in_features"], spec["out_features"], spec["bias"], spec["full_width"], device, dtype)
    if kind == "embedding":
        return FiberEmbedding(spec["num_embeddings"], spec["num_fibers"], spec["full_width"], spec["padding_idx"],
                              spec["embed_scale"], device, dtype)
    if kind == "input_linear":
        return FiberInputLinear(spec["full_width"], spec["out_features"], spec["num_fibers"], spec["bias"], device,
                                dtype)
    raise ValueError(f"Unknown compressed module kind {kind!r} in the checkpoint's quantization_config; "
                     "upgrade hf-fibration.")
