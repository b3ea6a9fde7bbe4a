"""hf_fibration.research.digits: the digits experiments' split, MLP and training loops."""

import pytest
import torch
from torch import nn

from hf_fibration.research.digits import (
    accuracy,
    digits_mlp,
    digits_split,
    random_batch_steps,
    train_epochs,
    train_step,
)


def test_split_is_seeded_stratified_and_scaled():
    x_tr, y_tr, x_te, y_te = digits_split(0)
    assert x_tr.shape[1] == 64 and len(x_tr) + len(x_te) == 1797 and abs(len(x_te) / 1797 - 0.3) < 0.01
    assert x_tr.dtype == torch.float32 and 0 <= float(x_tr.min()) and float(x_tr.max()) <= 1
    assert set(y_te.tolist()) == set(range(10))
    assert torch.equal(digits_split(0)[0], x_tr) and not torch.equal(digits_split(1)[0], x_tr)


def test_random_batch_steps_yields_before_and_after_every_step_and_the_loss_falls():
    x, y, x_te, y_te = digits_split(0)
    torch.manual_seed(0)
    model = digits_mlp(32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    with torch.no_grad():
        before = float(nn.functional.cross_entropy(model(x), y))
    done = list(random_batch_steps(model, optimizer, x, y, 100, 32, torch.Generator().manual_seed(0)))
    assert done == list(range(101))
    with torch.no_grad():
        after = float(nn.functional.cross_entropy(model(x), y))
    assert after < 0.5 * before and accuracy(model, x_te, y_te) > 0.7
    assert train_step(model, optimizer, x, y) == pytest.approx(after)


def test_train_epochs_learns_and_is_reproducible():
    x, y, x_te, y_te = digits_split(0)
    accuracies = []
    for _ in range(2):
        torch.manual_seed(0)
        model = digits_mlp(32)
        train_epochs(model, x, y, epochs=5)
        assert not model.training
        accuracies.append(accuracy(model, x_te, y_te))
    assert accuracies[0] == accuracies[1] > 0.6
