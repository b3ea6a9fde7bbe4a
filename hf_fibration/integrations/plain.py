"""Plain checkpoints: a compressed model written in its family's own architecture, loadable with transformers alone.

A family's config holds one MLP width for all layers (``intermediate_size``; Marian/BART one for the encoder and
one for the decoder; GPT-2 ``n_inner``) and full-width attention, residual stream and embeddings. A compressed
model whose MLP widths are equal (per stack) and whose other sites are uncompressed is exactly such a model: its
``FiberLinear``s are plain Linears of those shapes (GPT-2's become Conv1D again). ``to_plain`` builds it, refusing in
one line what the config cannot express; ``target.compress_uniform`` compresses to a size in this form.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from hf_fibration.core.embedding import FiberEmbedding, FiberInputLinear
from hf_fibration.core.modules import FiberLinear
from hf_fibration.integrations.loading import carry_files
from hf_fibration.integrations.run_record import RunRecord
from hf_fibration.models.architectures import architecture_for
from hf_fibration.models.surgery import get_module, linear_weight

# The config key of the MLP width, per family; seq2seq families name one per stack.
WIDTH_KEYS = {"bert": "intermediate_size", "llama": "intermediate_size", "gpt2": "n_inner"}
STACK_WIDTH_KEYS = {"encoder": "encoder_ffn_dim", "decoder": "decoder_ffn_dim"}
DROPPED_CONFIG_KEYS = ("quantization_config", "_pre_quantization_dtype")


def mlp_widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """Config key → {block: MLP width} for every block of ``model``."""
    arch = architecture_for(model.config.model_type)
    widths: dict[str, dict[str, int]] = {}
    for block_name, _ in arch.blocks(model):
        if arch.family in WIDTH_KEYS:
            key = WIDTH_KEYS[arch.family]
        else:
            key = STACK_WIDTH_KEYS["decoder" if "decoder." in f"{block_name}." else "encoder"]
        module = get_module(model, f"{block_name}.{arch.mlp.inputs[0]}")
        widths.setdefault(key, {})[block_name] = int(linear_weight(module)[0].shape[0])
    return widths


def _check_expressible(model: nn.Module) -> dict[str, int]:
    """The config's MLP widths, or a one-line ValueError saying what a plain config cannot express."""
    for name, module in model.named_modules():
        if isinstance(module, (FiberEmbedding, FiberInputLinear)):
            raise ValueError(f"Cannot write a plain checkpoint: the embedding's hidden dims are merged ({name}); a "
                             "plain config has full-width embeddings. Compress with --plain (MLPs only) instead.")
        index = getattr(module, "fiber_index", None) if isinstance(module, FiberLinear) else None
        if index is not None and not torch.equal(index.cpu(), torch.arange(module.out_features)):
            raise ValueError(f"Cannot write a plain checkpoint: {name} merges outputs ({module.out_features} of "
                             f"{module.full_width}, an attention or residual-stream site); a plain config has only "
                             "the MLP width. Compress with --plain (MLPs only) instead.")
    widths = {}
    for key, per_block in mlp_widths(model).items():
        values = sorted(set(per_block.values()))
        if len(values) > 1:
            raise ValueError(f"Cannot write a plain checkpoint: the MLP widths differ across layers ({min(values)} to "
                             f"{max(values)}) and a plain config holds one {key}. Compress with --plain for one "
                             "width.")
        widths[key] = values[0]
    return widths


def to_plain(model: PreTrainedModel) -> PreTrainedModel:
    """The same function as ``model`` in its family's own classes and config (no quantization_config), for a model
    whose compression a plain config expresses; else a one-line ValueError naming what it cannot express."""
    widths = _check_expressible(model)
    values = model.config.to_dict()
    for key in DROPPED_CONFIG_KEYS:
        values.pop(key, None)
    values.update(widths)
    added_bias = _mlp_biased(model) and values.get("mlp_bias") is False
    if added_bias:  # the compensated refit gave the consumer a bias: Llama's config adds one to all MLP projections
        values["mlp_bias"] = True
    config = type(model.config).from_dict(values)
    dtype = next(model.parameters()).dtype
    plain = type(model)(config).to(dtype).eval()
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    source = model.state_dict()
    state = {}
    for name, target in plain.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        if name not in source and added_bias and leaf == "bias" and _is_mlp_module(model, module_name):
            state[name] = torch.zeros_like(target)  # gate/up (and an unrefitted consumer) gain a zero bias
            continue
        if name not in source:
            raise ValueError(f"Cannot write a plain checkpoint: the compressed model has no {name}; it is not a "
                             f"{type(model).__name__} of this family.")
        tensor = source[name]
        own = get_module(plain, module_name) if module_name else plain
        if leaf == "weight" and isinstance(own, Conv1D) and isinstance(get_module(model, module_name), nn.Linear):
            tensor = tensor.T  # a FiberLinear stores (out, in); GPT-2's Conv1D (in, out)
        if tensor.shape != target.shape:
            raise ValueError(f"Cannot write a plain checkpoint: {name} is {tuple(tensor.shape)}, the family's "
                             f"config gives {tuple(target.shape)} (pruned attention heads or merged dims are not "
                             "expressible).")
        state[name] = tensor.contiguous()
    extra = sorted(k for k in source if k not in state and not k.endswith(".fiber_index"))
    if extra:
        raise ValueError(f"Cannot write a plain checkpoint: {extra[0]} has no place in a plain "
                         f"{type(model).__name__}.")
    plain.load_state_dict(state, strict=True)
    plain.tie_weights()
    _check_same_outputs(model, plain)
    return plain


def _mlp_biased(model: nn.Module) -> bool:
    arch = architecture_for(model.config.model_type)
    return any(get_module(model, f"{b}.{arch.mlp.out}").bias is not None for b, _ in arch.blocks(model))


def _is_mlp_module(model: nn.Module, name: str) -> bool:
    arch = architecture_for(model.config.model_type)
    return any(name.endswith("." + m) for m in (*arch.mlp.inputs, arch.mlp.out))


def refit_expressible(model: nn.Module) -> bool:
    """True when the family's config can hold the bias the compensated refit gives an MLP's consumer (it has one,
    or the config has ``mlp_bias``); Qwen2 and Mistral configs cannot, so a plain compression of them collapses
    without the refit."""
    return _mlp_biased(model) or hasattr(model.config, "mlp_bias")


@torch.no_grad()
def _check_same_outputs(model: nn.Module, plain: nn.Module) -> None:
    """Both models on one probe input: a conversion is written only when it is exact (up to float rounding)."""
    device = next(model.parameters()).device
    plain.to(device)
    ids = (torch.arange(8, device=device) * 7 + 3).remainder(model.config.vocab_size)[None]
    kwargs = {"input_ids": ids}
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids[:, :4]
    was_training = model.training
    model.eval()
    expected, got = model(**kwargs)[0].float(), plain(**kwargs)[0].float()
    model.train(was_training)
    scale = expected.abs().max().clamp_min(1e-6)
    if not torch.isfinite(got).all() or float((expected - got).abs().max() / scale) > 1e-3:
        raise ValueError("Cannot write a plain checkpoint: the plain model's outputs differ from the compressed "
                         "model's; report this with the model's family.")
    plain.cpu()


def save_plain(plain: PreTrainedModel, tokenizer, directory: Path, record: RunRecord | None = None,
               source: str | None = None) -> None:
    """Write ``plain`` (``to_plain``'s model) as safetensors with its config, the tokenizer, the source's other
    files (sentence-transformers modules, ...) and the run's record."""

    carry_files(source, directory)
    plain.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if record is not None:
        dataclasses.replace(record, plain=True).save(directory)
