"""Fibers, flavored opfibers and covers: synchronization, the Cover Coarse-Graining Theorem, the hooks."""

from __future__ import annotations

import torch
from torch import nn

from hf_fibration.core.opfibers import is_coarsening, splits, symmetries
from hf_fibration.research.emergence import FibrationCallback, SymmetryLogger

F64 = torch.float64


def planted_cover_mlp(seed: int = 0) -> nn.Sequential:
    """5 → 6 → 6 → 3 tanh MLP whose units {0, 1} form a cover in both hidden layers.

    Layer 2's units 0 and 1 are a fiber only through layer 1's coloring (their rows differ, their colored rows
    agree), and layer 1's units 0 and 1 an opfiber only through layer 2's opfibers."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for m in model[::2]:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=F64))
            m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=F64))
        w1, b1, w2, b2, w3 = model[0].weight, model[0].bias, model[2].weight, model[2].bias, model[4].weight
        w1[1], b1[1] = w1[0], b1[0]
        w2[2:, 1] = w2[2:, 0]
        w2[1] = w2[0]
        w2[1, 0], w2[1, 1] = w2[0, 1], w2[0, 0]
        b2[1] = b2[0]
        w3[:, 1] = w3[:, 0]
    return model


def test_planted_covers_are_found_and_synchronize() -> None:
    model = planted_cover_mlp()
    layers = symmetries(model, [0.0])[0.0]
    for layer in layers:
        assert layer.counts() == {"units": 6, "fibers": 5, "opfibers": 5, "covers": 5}
        assert layer.covers[0] == layer.covers[1]
    # fibers synchronize activities, opfibers errors (Eqs. 4, 6), for any input and target
    x = torch.randn(64, 5, dtype=F64)
    target = torch.randn(64, 3, dtype=F64)
    z1 = model[0](x)
    z1.retain_grad()
    z2 = model[2](torch.tanh(z1))
    z2.retain_grad()
    ((model[4](torch.tanh(z2)) - target) ** 2).sum().backward()
    for z, layer in zip((z1, z2), layers, strict=True):
        for labels, values in ((layer.fibers, z.detach()), (layer.opfibers, z.grad)):
            for c in labels.unique():
                members = (labels == c).nonzero().flatten()
                assert (values[:, members] - values[:, members[:1]]).abs().max() < 1e-12


def test_covers_never_split_under_full_batch_gd() -> None:
    model = planted_cover_mlp(1)
    x, y = torch.randn(128, 5, dtype=F64), torch.randn(128, 3, dtype=F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    prev = [s.covers for s in symmetries(model, [0.0])[0.0]]
    for _ in range(80):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        now = [s.covers for s in symmetries(model, [0.0])[0.0]]
        assert all(is_coarsening(a, b) and splits(a, b) == 0 for a, b in zip(prev, now, strict=True))
        assert all(c[0] == c[1] for c in now)
        prev = now
    # the check has teeth: a perturbation of one unit splits its cover
    with torch.no_grad():
        model[0].weight[1, 0] += 1e-3
    broken = [s.covers for s in symmetries(model, [0.0])[0.0]]
    assert splits(prev[0], broken[0]) == 1


def test_epsilon_only_coarsens_fibers() -> None:
    model = planted_cover_mlp(2)
    result = symmetries(model, [0.0, 0.5, 1.0, 3.0])
    counts = [sum(layer.counts()["fibers"] for layer in result[eps]) for eps in (0.0, 0.5, 1.0, 3.0)]
    assert counts == sorted(counts, reverse=True) and counts[-1] < counts[0]


def test_plain_hook_logs_every_n_steps() -> None:
    model = planted_cover_mlp()
    seen = []
    hook = SymmetryLogger(epsilons=(0.0, 0.1), every=2, log=lambda m, s: seen.append(s))
    for step in range(5):
        hook(model, step)
    assert seen == [0, 2, 4] and len(hook.history) == 3
    assert hook.history[-1]["symmetry/0/covers@0"] == 5.0
    assert hook.history[-1]["symmetry/cover_splits@0"] == 0.0


def test_trainer_callback_logs_symmetries(tmp_path) -> None:
    from tiny_models import tiny_model
    from transformers import Trainer, TrainingArguments

    model = tiny_model("bert")
    ids = torch.randint(3, 64, (16, 8))
    data = [{"input_ids": i, "labels": i} for i in ids]
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=100,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    callback = FibrationCallback(epsilons=(0.0, 0.05), every=2).attach(trainer)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "symmetry/covers@0" in h]
    assert [h["step"] for h in logged] == [2, 4]
    assert logged[0]["symmetry/fibers@0"] == 2 * 64  # two MLPs of 64 units, no exact fibers at random init
    assert callback.logger.history[-1]["step"] == 4
