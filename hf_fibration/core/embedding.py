"""Embedding hidden dims as fibers: store the unique columns once and repeat them; a tied head sums its input.

Their ``fiber_index`` is not in the state dict (tied aliases would share it, which safetensors refuses); the
checkpoint's config carries it instead.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class FiberEmbedding(nn.Embedding):
    """An embedding table of ``num_fibers`` columns whose lookups are repeated into ``full_width`` hidden dims."""

    def __init__(
        self,
        num_embeddings: int,
        num_fibers: int,
        full_width: int,
        padding_idx: int | None = None,
        embed_scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_embeddings, num_fibers, padding_idx=padding_idx, device=device, dtype=dtype)
        self.full_width = full_width
        self.embed_scale = embed_scale
        self.register_buffer("fiber_index", torch.zeros(full_width, dtype=torch.long, device=device),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(input_ids, self.weight, self.padding_idx).index_select(-1, self.fiber_index)
        return out if self.embed_scale == 1.0 else out * self.embed_scale

    def extra_repr(self) -> str:
        return super().extra_repr() + f", full_width={self.full_width}"


class FiberInputLinear(nn.Linear):
    """A Linear whose full-width input is first summed within fibers (a head tied to a ``FiberEmbedding``)."""

    def __init__(
        self,
        full_width: int,
        out_features: int,
        num_fibers: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_fibers, out_features, bias=bias, device=device, dtype=dtype)
        self.full_width = full_width
        self.register_buffer("fiber_index", torch.zeros(full_width, dtype=torch.long, device=device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        summed = x.new_zeros((*x.shape[:-1], self.in_features)).index_add_(-1, self.fiber_index, x)
        return F.linear(summed, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", full_width={self.full_width}"
