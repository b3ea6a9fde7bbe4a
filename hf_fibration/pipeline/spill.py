"""Tensors kept in a temporary folder (safetensors, one file per entry) until they are needed again, so that a search
holding many candidates for each site (a refit consumer per cut) keeps them on disk, not in memory."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class SpillFolder:
    """Write a dict of tensors, get back a key; ``load`` reads it (on the device each tensor came from). The folder
    is removed when the last reference to this object goes (or at exit)."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="hf-fibration-spill-")
        self._devices: dict[int, dict[str, torch.device]] = {}

    def save(self, tensors: dict[str, torch.Tensor]) -> int:
        key = len(self._devices)
        self._devices[key] = {name: t.device for name, t in tensors.items()}
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, self._path(key))
        return key

    def load(self, key: int) -> dict[str, torch.Tensor]:
        devices = self._devices[key]
        return {name: t.to(devices[name]) for name, t in load_file(self._path(key)).items()}

    def drop(self, key: int) -> None:
        """Delete entry ``key`` (its file goes now, not with the folder)."""
        Path(self._path(key)).unlink(missing_ok=True)

    def _path(self, key: int) -> str:
        return str(Path(self._folder.name) / f"{key}.safetensors")
