"""Plain ``from_pretrained`` for compressed checkpoints, through transformers' quantizer registry.

``config.json`` carries a ``quantization_config`` with ``quant_method: "fibration"`` and the shape of every
compressed module; the registered quantizer swaps in modules of those shapes before the weights load, so
heterogeneous widths load exactly. The registration happens on ``import hf_fibration``.

Before anything is allocated the recorded shapes are checked against the skeleton built from the base config
(a compressed module is never wider than the original) and against the safetensors headers. After the weights
load, every fiber index must be a map the compression can write (onto its fibers, numbered in order of first
use; a tied head's the same as its embedding's), every weight must be finite, and every tensor must have the
sha256 digest ``save_pretrained`` recorded in ``quantization_config.digests`` (of its bytes in the weights file;
the fiber indices kept in config.json too). A tampered, corrupted or truncated checkpoint fails in one line that
names the module or tensor, not at the first forward or, worse, in wrong outputs.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from hf_fibration.core.embedding import FiberEmbedding, FiberInputLinear
from hf_fibration.core.modules import FiberLinear
from hf_fibration.integrations.checkpoint_io import FIX, CheckpointError, hub_id_of, safetensors_header
from hf_fibration.integrations.shapes import build_fiber_modules, fiber_module_specs, restore_fiber_indices
from hf_fibration.models.surgery import FIBER_MODULES

QUANT_METHOD = "fibration"
LOAD_HINT = "This checkpoint was compressed by hf-fibration: run `import hf_fibration` before from_pretrained."
SHAPE_FIELDS = {"linear": ("in_features", "out_features"), "embedding": ("num_embeddings", "num_fibers", "full_width"),
                "input_linear": ("full_width", "out_features", "num_fibers")}


class FibrationQuantizationConfig(QuantizationConfigMixin):
    """The saved description of a compressed model: module shapes, the FibrationConfig, the run's report and the
    model it was compressed from (``base_model``: a hub id or the local path it was read from)."""

    def __init__(
        self,
        modules: dict[str, dict] | None = None,
        fibration: dict[str, Any] | None = None,
        report: dict[str, Any] | None = None,
        load_hint: str = LOAD_HINT,
        base_model: str | None = None,
        digests: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.modules = dict(modules or {})
        self.fibration = dict(fibration or {})
        self.report = dict(report or {})
        self.load_hint = load_hint
        self.base_model = base_model
        self.digests = dict(digests or {})  # tensor name → "sha256:<hex>" of its bytes as saved


class FibrationQuantizer(HfQuantizer):
    """Loads fibration checkpoints: builds the compressed modules on the skeleton, then the weights load."""

    requires_calibration = True  # nothing to quantize on the fly: only pre-compressed checkpoints load

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        specs = self.quantization_config.modules
        headers: dict[str, dict] = {}
        for file in kwargs.get("checkpoint_files") or []:
            if str(file).endswith(".safetensors"):
                headers.update(safetensors_header(file))
        check_specs(model, specs, headers)
        build_fiber_modules(model, specs)
        self._checkpoint_files = [str(f) for f in kwargs.get("checkpoint_files") or []]
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        restore_fiber_indices(model, self.quantization_config.modules)
        check_fiber_indices(model)
        check_finite(model)
        digests = getattr(self.quantization_config, "digests", None) or {}
        check_file_digests(getattr(self, "_checkpoint_files", []), digests)
        check_index_digests(model, digests)
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[None, dict]:
        """Called by ``save_pretrained`` before config.json is written: record the digest of every tensor."""
        digests = tensor_digests(model)
        for config in {id(c): c for c in (self.quantization_config,
                                           getattr(model.config, "quantization_config", None))}.values():
            if isinstance(config, FibrationQuantizationConfig):
                config.digests = digests
        return None, {}

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Register the config and quantizer under ``fibration`` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(FibrationQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(FibrationQuantizer)


def mark_compressed(model: nn.Module, fibration: dict[str, Any], report: dict[str, Any],
                    base_model: str | None = None) -> None:
    """Record the compressed modules in ``model.config`` so save_pretrained writes a loadable checkpoint.

    ``base_model`` defaults to the one recorded by an earlier compression of the same model, else the hub id of
    what the model was loaded from (``config._name_or_path``), else that path (so ``evaluate`` finds the base)."""
    previous = getattr(model.config, "quantization_config", None)
    loaded_from = model.config._name_or_path or None
    base_model = base_model or getattr(previous, "base_model", None) or hub_id_of(loaded_from) or loaded_from
    quant_config = FibrationQuantizationConfig(fiber_module_specs(model), fibration, report, base_model=base_model)
    model.config.quantization_config = quant_config
    model.hf_quantizer = FibrationQuantizer(quant_config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def _original_dims(module: nn.Module) -> tuple[int, int]:
    """(rows, columns) of an original module on the skeleton: (out, in) of a Linear/Conv1D, (vocab, dim)."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if hasattr(module, "nf") and getattr(module, "weight", None) is not None:  # GPT-2 Conv1D: weight is (in, out)
        return int(module.nf), int(module.weight.shape[0])
    raise CheckpointError(f"Compressed module entry for a {type(module).__name__}, which hf-fibration never "
                          f"writes; {FIX}.")


def _bad(name: str, what: str) -> CheckpointError:
    return CheckpointError(f"Compressed module {name!r} in config.json's quantization_config {what}; {FIX}.")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_index(name: str, index: Any, length: int, fibers: int) -> None:
    if not isinstance(index, list) or len(index) != length:
        raise _bad(name, f"has a fiber_index of the wrong length (expected {length})")
    if not all(isinstance(i, int) and 0 <= i < fibers for i in index):
        raise _bad(name, f"has a fiber_index value outside [0, {fibers})")


def _header_shape(headers: dict[str, dict], prefix: str, name: str, suffix: str) -> list[int] | None:
    for key in (f"{name}.{suffix}", f"{prefix}.{name}.{suffix}",
                f"{name.removeprefix(prefix + '.')}.{suffix}" if prefix else None):
        if key and key in headers:
            return list(headers[key].get("shape", []))
    return None


def check_specs(model: nn.Module, specs: Any, headers: dict[str, dict] | None = None) -> None:
    """Check the recorded module shapes against the skeleton (the base config) and the files' headers."""
    if not isinstance(specs, dict):
        raise CheckpointError(f"config.json's quantization_config has no table of compressed modules; {FIX}.")
    headers = headers or {}
    prefix = getattr(model, "base_model_prefix", "") or ""
    for name, spec in specs.items():
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind not in SHAPE_FIELDS:
            raise _bad(name, f"has an unknown kind {kind!r} (a newer hf-fibration may read it)")
        for key in SHAPE_FIELDS[kind]:
            if not _is_count(spec.get(key)):
                raise _bad(name, f"has {key}={spec.get(key)!r}, not a positive integer")
        try:
            original = model.get_submodule(name)
        except AttributeError:
            raise _bad(name, "names no module of this architecture") from None
        rows, cols = _original_dims(original)
        if kind == "linear":
            full = spec.get("full_width")
            if full is not None and full != rows:
                raise _bad(name, f"has full_width={full!r}; the base model's width is {rows}")
            if spec["out_features"] > rows or spec["in_features"] > cols:
                raise _bad(name, f"is {spec['out_features']}×{spec['in_features']}, wider than the base model's "
                                 f"{rows}×{cols}")
            expected = {"weight": [spec["out_features"], spec["in_features"]]}
            if full is not None:
                expected["fiber_index"] = [full]
        elif kind == "embedding":
            if spec["num_embeddings"] != rows or spec["full_width"] != cols or spec["num_fibers"] > cols:
                raise _bad(name, f"is {spec['num_embeddings']}×{spec['num_fibers']} of width {spec['full_width']}; "
                                 f"the base model's embedding is {rows}×{cols}")
            _check_index(name, spec.get("fiber_index"), cols, spec["num_fibers"])
            expected = {"weight": [rows, spec["num_fibers"]]}
        else:
            if spec["out_features"] != rows or spec["full_width"] != cols or spec["num_fibers"] > cols:
                raise _bad(name, f"is {spec['out_features']}×{spec['num_fibers']} of width {spec['full_width']}; "
                                 f"the base model's layer is {rows}×{cols}")
            _check_index(name, spec.get("fiber_index"), cols, spec["num_fibers"])
            expected = {"weight": [rows, spec["num_fibers"]]}
        for suffix, shape in expected.items():
            found = _header_shape(headers, prefix, name, suffix)
            if found is not None and found != shape:
                raise CheckpointError(f"Compressed module {name!r}: config.json records {suffix} {shape} but the "
                                      f"weights file holds {found}; {FIX}.")


def check_fiber_indices(model: nn.Module) -> None:
    """Every loaded fiber index must address an existing fiber (else the first forward fails with IndexError)."""
    for name, module in model.named_modules():
        index = getattr(module, "fiber_index", None)
        if not isinstance(module, FIBER_MODULES) or index is None or index.device.type == "meta":
            continue
        fibers = module.out_features if isinstance(module, FiberLinear) else module.weight.shape[1]
        if index.numel() != module.full_width:
            raise CheckpointError(f"Compressed module {name!r} has {index.numel()} fiber indices for width "
                                  f"{module.full_width}; {FIX}.")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= fibers):
            raise CheckpointError(f"Compressed module {name!r} has a fiber index outside [0, {fibers}) "
                                  f"(found {int(index.min())}..{int(index.max())}); {FIX}.")
        _check_map(name, index, fibers)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = isinstance(head, FiberInputLinear) and isinstance(embedding, FiberEmbedding) and \
        head.weight is embedding.weight and head.fiber_index.device.type != "meta"
    if tied and not torch.equal(head.fiber_index, embedding.fiber_index):
        raise CheckpointError(f"The tied output head's fiber index differs from the input embedding's; {FIX}.")


def _check_map(name: str, index: torch.Tensor, fibers: int) -> None:
    """A fiber index the compression writes maps onto every fiber, numbered in the order slots first use them."""
    n = index.numel()
    first = torch.full((fibers,), n, dtype=torch.long, device=index.device)
    first.scatter_reduce_(0, index.long(), torch.arange(n, device=index.device), reduce="amin")
    if fibers and int(first.max()) >= n:
        raise CheckpointError(f"Compressed module {name!r} has a fiber index that never uses fiber "
                              f"{int(torch.argmax(first))} (not a map onto its {fibers} fibers); {FIX}.")
    if fibers > 1 and not bool((first[1:] > first[:-1]).all()):
        raise CheckpointError(f"Compressed module {name!r} has a fiber index whose fibers are not numbered in "
                              f"order of first use (a permuted index); {FIX}.")


def _digest(data: Any) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> Any:
    """The tensor's bytes as safetensors stores them (little-endian, contiguous), without a copy on CPU."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


def tensor_digests(model: nn.Module) -> dict[str, str]:
    """sha256 of every state-dict tensor's bytes, and of the fiber indices config.json keeps (not in the file)."""
    digests = {name: _digest(_tensor_bytes(t)) for name, t in model.state_dict().items()
               if isinstance(t, torch.Tensor) and t.device.type != "meta"}
    for name, module in model.named_modules():
        if isinstance(module, (FiberEmbedding, FiberInputLinear)):
            digests[f"{name}.fiber_index"] = _digest(_tensor_bytes(module.fiber_index))
    return digests


def check_file_digests(files: list[str], digests: dict[str, str]) -> None:
    """Each tensor in the .safetensors files whose digest was recorded must hash to it (bit flips, edits)."""
    if not digests:
        return  # written before digests were recorded
    for file in files:
        if not file.endswith(".safetensors"):
            continue
        path = Path(file)
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
            if path.stat().st_size == 8 + length:
                continue
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                view = memoryview(data)
                try:
                    for name, info in header.items():
                        expected = digests.get(name)
                        if name == "__metadata__" or expected is None:
                            continue
                        start, end = (8 + length + o for o in info["data_offsets"])
                        if _digest(view[start:end]) != expected:
                            raise CheckpointError(f"Tensor {name!r} in {path.name} does not match the sha256 digest "
                                                  f"recorded when it was saved (the file was altered or corrupted); "
                                                  f"{FIX}.")
                finally:
                    view.release()


def check_index_digests(model: nn.Module, digests: dict[str, str]) -> None:
    """The fiber indices read from config.json must be the ones saved (they are not in the weights file)."""
    for name, module in model.named_modules():
        expected = digests.get(f"{name}.fiber_index")
        if not isinstance(module, (FiberEmbedding, FiberInputLinear)) or expected is None \
                or module.fiber_index.device.type == "meta":
            continue
        if _digest(_tensor_bytes(module.fiber_index)) != expected:
            raise CheckpointError(f"Compressed module {name!r}: the fiber_index in config.json does not match the "
                                  f"digest recorded when it was saved; {FIX}.")


def check_finite(model: nn.Module) -> None:
    """No NaN or inf in any loaded weight (they would reach every output)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(tensor.isfinite().all()):
            raise CheckpointError(f"Weight {name!r} holds NaN or inf values; {FIX}.")
