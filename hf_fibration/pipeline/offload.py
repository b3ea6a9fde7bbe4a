"""Compress a model larger than the accelerator's memory: its blocks rest where the model was loaded (the CPU) and
each one moves to the execution device only for its own forward pass, as SparseGPT and Wanda run LLMs; what lies
outside the blocks (embeddings, final norm, head) stays on the execution device throughout.

Every policy works unchanged under it: the collapse and refits happen while a block rests, so the compressed
modules are built where the model lives, and every forward pass (evaluations, calibration captures, block replays)
brings in one block at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from hf_fibration.models.architectures import architecture_for
from hf_fibration.models.surgery import get_module, model_type_of, set_module


class BlockStreamer:
    """Forward hooks that bring a block to ``device`` before its forward and send it back after; ``resident``
    counts the blocks on the device (at most one while a forward runs)."""

    def __init__(self, model: nn.Module, device: torch.device | str) -> None:
        self.model, self.device = model, torch.device(device)
        self.rest = next(model.parameters()).device
        self.blocks = architecture_for(model_type_of(model)).blocks(model)
        self.resident = 0
        self.max_resident = 0
        self._handles: list = []

    def bring(self, block: nn.Module, *_: object) -> None:
        block.to(self.device)
        self.resident += 1
        self.max_resident = max(self.max_resident, self.resident)

    def send_back(self, block: nn.Module, *_: object) -> None:
        block.to(self.rest)
        self.resident -= 1

    def install(self) -> None:
        """Move everything outside the blocks to the device (the blocks stay) and hook the blocks."""
        self._move_outside(self.device)
        for _, block in self.blocks:
            self._handles.append(block.register_forward_pre_hook(self.bring))
            self._handles.append(block.register_forward_hook(self.send_back, always_call=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._move_outside(self.rest)

    def _move_outside(self, device: torch.device) -> None:
        placeholders = {name: nn.Identity() for name, _ in self.blocks}
        for name, placeholder in placeholders.items():
            set_module(self.model, name, placeholder)
        try:
            self.model.to(device)
        finally:
            for name, block in self.blocks:
                if get_module(self.model, name) is placeholders[name]:
                    set_module(self.model, name, block)


@contextmanager
def streamed_blocks(model: nn.Module, device: torch.device | str | None) -> Iterator[BlockStreamer | None]:
    """Run ``model`` block by block on ``device`` inside the context (nothing changes when ``device`` is None)."""
    if device is None:
        yield None
        return
    streamer = BlockStreamer(model, device)
    streamer.install()
    try:
        yield streamer
    finally:
        streamer.remove()
