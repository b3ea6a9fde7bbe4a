"""Compressed modules: smaller layers plus an index buffer that repeats fiber outputs into a full-width stream."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class FiberLinear(nn.Linear):
    """An ``nn.Linear`` over fibers: ``in_features`` inputs, ``out_features`` fiber outputs.

    With ``full_width`` set, the fiber outputs are repeated by ``fiber_index`` (fiber id of every slot), so a
    layer that writes into the residual stream keeps it full width at the cost of one gather, not a matmul.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        full_width: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.full_width = full_width
        if full_width is not None:
            self.register_buffer("fiber_index", torch.zeros(full_width, dtype=torch.long, device=device))
        else:
            self.fiber_index = None

    @classmethod
    def from_weights(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, fiber_index: torch.Tensor | None = None
    ) -> FiberLinear:
        out_features, in_features = weight.shape
        full_width = None if fiber_index is None else int(fiber_index.numel())
        layer = cls(in_features, out_features, bias is not None, full_width, weight.device, weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
            if fiber_index is not None:
                layer.fiber_index.copy_(fiber_index)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if self.fiber_index is None else y.index_select(-1, self.fiber_index)

    @property
    def output_width(self) -> int:
        return self.out_features if self.full_width is None else self.full_width

    def extra_repr(self) -> str:
        width = "" if self.full_width is None else f", full_width={self.full_width}"
        return super().extra_repr() + width


def linear_from_weights(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def conv2d_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """A Conv2d with ``conv``'s geometry and the given (collapsed) weight."""
    if conv.groups != 1:
        raise ValueError("Grouped convolutions are not supported; only groups=1 Conv2d layers can be collapsed.")
    new = nn.Conv2d(
        weight.shape[1], weight.shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        bias=bias is not None, padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of every Linear, Conv2d and LSTM in one forward pass, counted with hooks."""
    total = 0

    def linear_hook(module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += args[0].numel() // module.in_features * module.in_features * module.out_features

    def conv_hook(module: nn.Conv2d, args: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * module.in_channels * kh * kw // module.groups

    def lstm_hook(module: nn.LSTM, args: tuple, output: tuple) -> None:
        nonlocal total
        steps = args[0].numel() // module.input_size
        total += steps * 4 * module.hidden_size * (module.input_size + module.hidden_size)

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.LSTM):
            hooks.append(m.register_forward_hook(lstm_hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return total
