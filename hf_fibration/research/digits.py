"""The digits experiments' shared parts (scripts/mlp_digits.py, plasticity_digits.py, emergence_digits.py):
sklearn's 8×8 digits split 70/30, the 64-h-h-k MLP, its two training loops and test accuracy."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

DigitsSplit = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def digits_split(seed: int) -> DigitsSplit:
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], a stratified 30% test split drawn by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return torch.tensor(x_tr), torch.tensor(y_tr), torch.tensor(x_te), torch.tensor(y_te)


def digits_mlp(hidden: int, classes: int = 10, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """The MLP 64-``hidden``-``hidden``-``classes``, initialized from torch's global generator."""
    return nn.Sequential(nn.Linear(64, hidden), activation(), nn.Linear(hidden, hidden), activation(),
                         nn.Linear(hidden, classes))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimizer step on the cross-entropy of ``model(x)`` against the labels ``y``; returns the loss."""
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def train_epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int = 64,
                 lr: float = 1e-3) -> None:
    """Adam over ``epochs`` passes, each in a fresh random order (torch's global generator); leaves the model in
    eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            train_step(model, optimizer, x[idx], y[idx])
    model.eval()


def random_batch_steps(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                       steps: int, batch: int, generator: torch.Generator) -> Iterator[int]:
    """Trains ``steps`` steps on minibatches drawn with replacement by ``generator``, yielding the number of steps
    done before the first step and after each one (0, 1, …, ``steps``), so the caller measures the model as it
    stands."""
    yield 0
    for done in range(1, steps + 1):
        idx = torch.randint(0, len(x), (batch,), generator=generator)
        train_step(model, optimizer, x[idx], y[idx])
        yield done


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of ``x`` whose top logit is the label in ``y``."""
    return float((model(x).argmax(1) == y).float().mean())
