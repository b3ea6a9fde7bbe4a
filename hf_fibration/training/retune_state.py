"""The retuning checkpoint: what a resumed run needs to continue exactly as an uninterrupted one would.

A state directory holds safetensors and JSON only (never pickle): the model, the best weights so far, the optimizer's
tensors and scalars, the LR scheduler's counters, the RNG states of every process (torch CPU and CUDA: dropout
draws from them) and ``trainer.json`` (step, epoch, best loss, history). The batch order of an epoch is a function
of (seed, epoch) alone, so the resumed epoch replays it and skips the steps already taken. A new checkpoint is
written beside the previous one and swapped in by renames: a kill at any moment leaves one complete state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn


class EpochPermutation(torch.utils.data.Sampler):
    """``range(n)`` in an order that is a function of (seed, epoch), so a resumed epoch replays it.

    The orders are those a ``DataLoader(shuffle=True)`` with a generator seeded by ``seed`` gives epoch after epoch
    (per epoch: one seed draw, the permutation, one permutation drawn at exhaustion), as retuning used before:
    earlier runs keep their results."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch + 1):
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            order = torch.randperm(self.n, generator=generator)
            torch.randperm(self.n, generator=generator)
        return iter(order.tolist())


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU, and every CUDA device when CUDA is in use)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[f"cuda.{i}"] for i in range(len(state)) if f"cuda.{i}" in state]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


def _save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    save_file(tensors, path / "optimizer.safetensors")
    (path / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    meta = json.loads((path / "optimizer.json").read_text())
    state: dict[int, dict] = {}
    for key, value in {**load_file(path / "optimizer.safetensors"), **meta["scalars"]}.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _siblings(state_dir: Path) -> tuple[Path, Path]:
    return state_dir.with_name(state_dir.name + ".new"), state_dir.with_name(state_dir.name + ".old")


def save_state(state_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, best_state: dict,
               progress_state: dict, rng_states: list[dict[str, torch.Tensor]]) -> None:
    """Write a complete checkpoint (``rng_states``: one per process, in process order) and swap it in."""
    new, old = _siblings(state_dir)
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    save_model(model, str(new / "model.safetensors"))
    _save_optimizer(optimizer, new)
    save_file({k: v.contiguous() for k, v in best_state.items()}, str(new / "best.safetensors"))
    save_file({f"{rank}.{k}": v.cpu().contiguous() for rank, s in enumerate(rng_states) for k, v in s.items()},
              str(new / "rng.safetensors"))
    (new / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    (new / "trainer.json").write_text(json.dumps(progress_state))  # last: its presence marks a complete state
    if state_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(state_dir, old)
    os.replace(new, state_dir)
    shutil.rmtree(old, ignore_errors=True)


def complete_state(state_dir: Path) -> Path | None:
    """The newest complete checkpoint: ``state_dir``, or the previous one when a kill fell between the renames."""
    for path in (state_dir, _siblings(state_dir)[1]):
        if (path / "trainer.json").exists():
            return path
    return None


def load_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, process_index: int,
               device) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Restore model, optimizer and scheduler from ``path``; return the trainer state, the best weights and this
    process's RNG state (None for a checkpoint written before RNG states were saved)."""
    load_model(model, path / "model.safetensors", strict=True)
    _load_optimizer(optimizer, path)
    progress_state = json.loads((path / "trainer.json").read_text())
    if (path / "scheduler.json").exists():
        scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    else:  # older checkpoints: replay the scheduler's steps
        for _ in range(progress_state["step"]):
            scheduler.step()
    best = load_file(path / "best.safetensors", device=str(device))
    rng = None
    if (path / "rng.safetensors").exists():
        saved = load_file(path / "rng.safetensors")
        ranks = sorted({int(k.split(".", 1)[0]) for k in saved})
        rank = ranks[process_index % len(ranks)]
        rng = {k.split(".", 1)[1]: v for k, v in saved.items() if k.startswith(f"{rank}.")}
    return progress_state, best, rng
