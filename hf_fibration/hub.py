"""Plain ``from_pretrained`` for compressed checkpoints, through transformers' quantizer registry.

``config.json`` carries a ``quantization_config`` with ``quant_method: "fibration"`` and the shape of every
compressed module; the registered quantizer swaps in modules of those shapes before the weights load, so
heterogeneous widths load exactly. The registration happens on ``import hf_fibration``.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .patch import build_fiber_modules, fiber_module_specs, restore_fiber_indices

QUANT_METHOD = "fibration"
LOAD_HINT = "This checkpoint was compressed by hf-fibration: run `import hf_fibration` before from_pretrained."


class FibrationQuantizationConfig(QuantizationConfigMixin):
    """The saved description of a compressed model: module shapes, the FibrationConfig and the run's report."""

    def __init__(
        self,
        modules: dict[str, dict] | None = None,
        fibration: dict[str, Any] | None = None,
        report: dict[str, Any] | None = None,
        load_hint: str = LOAD_HINT,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.modules = dict(modules or {})
        self.fibration = dict(fibration or {})
        self.report = dict(report or {})
        self.load_hint = load_hint


class FibrationQuantizer(HfQuantizer):
    """Loads fibration checkpoints: builds the compressed modules on the skeleton, then the weights load."""

    requires_calibration = True  # nothing to quantize on the fly: only pre-compressed checkpoints load

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        build_fiber_modules(model, self.quantization_config.modules)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        restore_fiber_indices(model, self.quantization_config.modules)
        return model

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


def mark_compressed(model: nn.Module, fibration: dict[str, Any], report: dict[str, Any]) -> None:
    """Record the compressed modules in ``model.config`` so save_pretrained writes a loadable checkpoint."""
    quant_config = FibrationQuantizationConfig(fiber_module_specs(model), fibration, report)
    model.config.quantization_config = quant_config
    model.hf_quantizer = FibrationQuantizer(quant_config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
