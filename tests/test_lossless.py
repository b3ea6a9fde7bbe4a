"""Lossless compression (Alg. 4.1/4.2): planted reducibility of every kind, brute-force rank, exact functions."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_models import inputs, tiny_model
from torch import nn

from hf_fibration.core.collapse import collapse_weight
from hf_fibration.core.lossless import collapse_layer, compress_lossless, lossless_partition, rank
from hf_fibration.models.surgery import get_module
from hf_fibration.policies.lossless import compress_lossless_pretrained, mlp_sites
from hf_fibration.policies.lossless import rank as hf_rank

F64 = torch.float64


def planted_tanh(seed: int, h: int = 7, n: int = 2, m: int = 2):
    """A tanh net whose units copy, negate, zero or cancel one another at random."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(h, n, generator=g, dtype=F64)
    b = torch.randn(h, generator=g, dtype=F64)
    a = torch.randn(m, h, generator=g, dtype=F64)
    for i in range(1, h):
        kind = int(torch.randint(0, 7, (1,), generator=g))
        j = int(torch.randint(0, i, (1,), generator=g))
        if kind == 1:  # equal to an earlier unit
            w[i], b[i] = w[j], b[j]
        elif kind == 2:  # negated
            w[i], b[i] = -w[j], -b[j]
        elif kind == 3:  # zero in-weights: a constant
            w[i] = 0.0
        elif kind == 4:  # zero out-weights
            a[:, i] = 0.0
        elif kind == 5:  # equal with a cancelling out-weight (the merged unit has zero outgoing weight)
            w[i], b[i], a[:, i] = w[j], b[j], -a[:, j]
        elif kind == 6:  # negated with an equal out-weight (also cancels: α = a_j − a_i)
            w[i], b[i], a[:, i] = -w[j], -b[j], a[:, j]
    return w, b, a, torch.randn(m, generator=g, dtype=F64)


def brute_force_rank(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> int:
    """Min over all set partitions of the units into mergeable blocks of the units that remain."""
    h = w.shape[0]
    const = [bool((w[i] == 0).all()) for i in range(h)]

    def sign_to(i: int, j: int) -> int:
        ri, rj = torch.cat([w[i], b[i:i + 1]]), torch.cat([w[j], b[j:j + 1]])
        return 1 if torch.equal(ri, rj) else -1 if torch.equal(ri, -rj) else 0

    def block_cost(block: list[int]) -> int | None:
        if all(const[i] for i in block):
            return 0  # constants fold into the output bias
        if any(const[i] for i in block):
            return None
        signs = [sign_to(i, block[0]) for i in block]
        if 0 in signs:
            return None
        alpha = sum(s * a[:, i] for s, i in zip(signs, block, strict=True))
        return 0 if bool((alpha == 0).all()) else 1

    best = h
    for labels in _set_partitions(h):
        blocks = [[i for i in range(h) if labels[i] == k] for k in range(max(labels) + 1)]
        costs = [block_cost(bl) for bl in blocks]
        if None not in costs:
            best = min(best, sum(costs))
    return best


def _set_partitions(n: int):
    def rec(i: int, labels: list[int], k: int):
        if i == n:
            yield list(labels)
            return
        for lab in range(k + 1):
            labels.append(lab)
            yield from rec(i + 1, labels, max(k, lab + 1))
            labels.pop()
    yield from rec(0, [], 0)


def reducible(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> bool:
    """Sussmann's conditions (i)–(iv) on a compressed parameter."""
    rows = torch.cat([w, b.unsqueeze(1)], 1)
    if (a == 0).all(0).any() or (w == 0).all(1).any():
        return True
    return any(torch.equal(rows[i], rows[j]) or torch.equal(rows[i], -rows[j])
               for i, j in itertools.combinations(range(rows.shape[0]), 2))


@pytest.mark.parametrize("seed", range(40))
def test_planted_tanh_reaches_brute_force_rank_and_keeps_function(seed: int) -> None:
    w, b, a, d = planted_tanh(seed)
    part = lossless_partition([(w, b)], a, "tanh", rtol=0.0)
    assert part.num_fibers == brute_force_rank(w, b, a) == rank((w, b, a), rtol=0.0)
    assert part.num_removed == w.shape[0] - part.num_fibers
    w2, b2, a2, d2 = collapse_layer(w, b, a, d, part)
    assert not reducible(w2, b2, a2)  # incompressible (Theorem 4.1 ii)
    x = torch.randn(500, w.shape[1], generator=torch.Generator().manual_seed(seed), dtype=F64)
    before = torch.tanh(x @ w.T + b) @ a.T + d
    after = torch.tanh(x @ w2.T + b2) @ a2.T + d2
    assert (before - after).abs().max() < 1e-10


def test_every_rule_is_counted() -> None:
    w = torch.tensor([[1.0, 2.0], [1.0, 2.0], [-1.0, -2.0], [0.0, 0.0], [3.0, 1.0], [5.0, -1.0]], dtype=F64)
    b = torch.tensor([0.5, 0.5, -0.5, 0.7, 0.1, 0.2], dtype=F64)
    a = torch.tensor([[1.0, 2.0, 4.0, 4.0, 5.0, 0.0]], dtype=F64)
    part = lossless_partition([(w, b)], a, "tanh", rtol=0.0)
    assert part.removed == {"zero_in": 1, "equal": 1, "negated": 1, "scaled": 0, "zero_out": 1}
    assert part.num_fibers == 2


@pytest.mark.parametrize("act", [nn.ReLU(), nn.Tanh(), nn.GELU(), nn.Sigmoid(), nn.LeakyReLU(0.2)])
def test_deep_nets_reduce_only_exactly(act: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    lin1, lin2, lin3 = nn.Linear(5, 8).double(), nn.Linear(8, 6).double(), nn.Linear(6, 3).double()
    with torch.no_grad():
        for lin in (lin1, lin2, lin3):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=F64))
        lin1.weight[1], lin1.bias[1] = lin1.weight[0], lin1.bias[0]  # equal
        lin1.weight[2], lin1.bias[2] = -lin1.weight[0], -lin1.bias[0]  # negated: tanh/sigmoid only
        lin1.weight[3], lin1.bias[3] = 2.5 * lin1.weight[4], 2.5 * lin1.bias[4]  # scaled: ReLU family only
        lin1.weight[5] = 0.0  # constant
        lin2.weight[:, 6] = 0.0  # zero out-weight
        # layer 2 rows that become equal once layer 1's units 0 and 1 merge (their columns sum): a second sweep
        lin2.weight[1] = lin2.weight[0]
        lin2.weight[1, 0], lin2.weight[1, 1] = lin2.weight[0, 1], lin2.weight[0, 0]
        lin2.bias[1] = lin2.bias[0]
    model = nn.Sequential(lin1, act, lin2, act, lin3)
    small, report = compress_lossless(model)
    x = torch.randn(300, 5, generator=g, dtype=F64)
    assert (model(x) - small(x)).abs().max() < 1e-10
    removed = report.removed
    name = type(act).__name__
    assert removed["equal"] >= 2 and removed["zero_in"] >= 1
    assert (removed["negated"] >= 1) == (name in ("Tanh", "Sigmoid"))
    assert (removed["scaled"] >= 1) == (name in ("ReLU", "LeakyReLU"))
    assert report.sweeps >= 2


def test_gated_units_merge_only_equal_pairs() -> None:
    g = torch.Generator().manual_seed(1)
    wg, wu = torch.randn(6, 4, generator=g, dtype=F64), torch.randn(6, 4, generator=g, dtype=F64)
    wd = torch.randn(3, 6, generator=g, dtype=F64)
    wg[1], wu[1] = wg[0], wu[0]  # equal pair
    wg[2], wu[2] = wg[3], 2 * wu[3]  # scaled up-row: not claimed
    wg[4] = 0.0  # silu(0) = 0: a dead unit
    part = lossless_partition([(wg, None), (wu, None)], wd, "silu", out_bias=False)
    assert part.removed["equal"] == 1 and part.removed["zero_in"] == 1 and part.num_fibers == 4
    x = torch.randn(100, 4, generator=g, dtype=F64)
    f = lambda wg, wu, wd: (nn.functional.silu(x @ wg.T) * (x @ wu.T)) @ wd.T  # noqa: E731
    g2, _ = collapse_weight(wg, None, part)
    u2, _ = collapse_weight(wu, None, part)
    d2, _ = collapse_weight(wd, None, None, part)
    assert (f(wg, wu, wd) - f(g2, u2, d2)).abs().max() < 1e-10


def test_float32_random_net_is_incompressible() -> None:
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)).float()
    assert rank(model) == 16


def _plant_mlp(model, family: str) -> None:
    """Equal, negated, scaled, constant and zero-out units in every MLP of a tiny transformers model."""
    with torch.no_grad():
        for site in mlp_sites(model):
            ins = [get_module(model, m) for m in site.modules_in()]
            out = get_module(model, site.modules[-1])
            for mod in ins:
                w = mod.weight if family != "gpt2" else mod.weight.T  # a view either way
                w[1] = w[0]
                w[3] = 2.5 * w[4]
                if mod.bias is not None:
                    mod.bias[1] = mod.bias[0]
                    mod.bias[3] = 2.5 * mod.bias[4]
                w[2] = -w[5]
                if mod.bias is not None:
                    mod.bias[2] = -mod.bias[5]
            (ins[0].weight if family != "gpt2" else ins[0].weight.T)[6] = 0.0
            out_w = out.weight if family != "gpt2" else out.weight.T
            out_w[:, 7] = 0.0


@pytest.mark.parametrize("family,act", [("bert", "relu"), ("bert", "tanh"), ("bert", "gelu"), ("gpt2", "gelu_new"),
                                        ("llama", "silu")])
def test_transformer_mlps_lose_only_exact_units(family: str, act: str) -> None:
    model = tiny_model(family)
    setattr(model.config, "activation_function" if family == "gpt2" else "hidden_act", act)
    if family == "bert":
        from transformers.activations import ACT2FN
        for layer in model.bert.encoder.layer:
            layer.intermediate.intermediate_act_fn = ACT2FN[act]
    _plant_mlp(model, family)
    units = sum(s.units(model) for s in mlp_sites(model))
    predicted = hf_rank(model)
    batch = inputs(model)
    report = compress_lossless_pretrained(model, batches=[batch])
    assert report.units_after == predicted < units
    assert report.max_abs_delta < 1e-4
    removed = report.removed
    assert removed["equal"] >= 2 and removed["zero_out"] >= 2 and removed["zero_in"] >= 2
    assert (removed["negated"] > 0) == (act == "tanh")
    assert (removed["scaled"] > 0) == (act == "relu")


def test_config_lossless_through_compress_pretrained(tmp_path) -> None:
    import hf_fibration
    from hf_fibration import FibrationConfig, compress_pretrained

    model = tiny_model("bert")
    _plant_mlp(model, "bert")
    batch = inputs(model)
    before = model(**batch).logits
    expected = hf_fibration.rank(model)
    report = compress_pretrained(model, FibrationConfig(lossless=True), progress=False)
    assert sum(x.units_after for x in report.layers) == expected
    assert report.params_after < report.params_before and report.lossless.removed["equal"] >= 2
    assert (model(**batch).logits - before).abs().max() < 1e-4
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert (reloaded(**batch).logits - before).abs().max() < 1e-4
