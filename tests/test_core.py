import numpy as np
import pytest
import torch
from torch import nn

from hf_fibration.core import (
    FiberDendrogram,
    FiberLinear,
    FiberPartition,
    collapse_weight,
    colored_in_weights,
    compress_lstm,
    compress_sequential,
    count_flops,
    count_parameters,
    relabel,
    sum_rows,
)


def planted_rows(n_fibers: int, sizes: list[int], width: int, seed: int = 0, scales: bool = False):
    """Rows with planted duplicates (or positive multiples); returns the rows and the true fiber of each."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_fibers, width, generator=g)
    truth = torch.cat([torch.full((s,), f) for f, s in enumerate(sizes)])
    perm = torch.randperm(len(truth), generator=g)
    truth = truth[perm]
    rows = base[truth]
    if scales:
        rows = rows * (0.5 + torch.rand(len(truth), 1, generator=g) * 2)
    return rows, truth


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(relabel(a), relabel(b))


def test_exact_mode_finds_exactly_the_planted_fibers():
    rows, truth = planted_rows(6, [3, 1, 4, 2, 1, 5], 32)
    part = FiberDendrogram(rows).cut(0.0)
    assert same_partition(part.labels, truth)
    assert part.num_fibers == 6


def test_exact_mode_does_not_merge_multiples_unless_scale_aware():
    rows, truth = planted_rows(5, [2, 3, 1, 4, 2], 16, scales=True)
    assert FiberDendrogram(rows).cut(0.0).num_fibers == len(truth)
    part = FiberDendrogram(rows, scale_aware=True).cut(0.0)
    assert same_partition(part.labels, truth)
    # the scales reconstruct every row from its fiber direction
    direction = torch.stack([rows[part.labels == f][0] / part.scales[part.labels == f][0] for f in range(5)])
    torch.testing.assert_close(direction[part.labels].double() * part.scales[:, None], rows.double())


def test_near_duplicates_are_not_exact():
    rows, _ = planted_rows(3, [2, 2, 2], 8)
    rows[1] += 1e-3
    part = FiberDendrogram(rows).cut(0.0)
    assert part.num_fibers > 3


def test_cut_is_monotone_in_epsilon():
    rows = torch.randn(60, 12, generator=torch.Generator().manual_seed(1))
    dendro = FiberDendrogram(rows, "average")
    counts = [dendro.cut(eps).num_fibers for eps in np.linspace(0, 1.99, 40)]
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))
    assert counts[0] == 60 and counts[-1] < 10


def test_epsilon_for_count_matches_cut():
    rows = torch.randn(40, 10, generator=torch.Generator().manual_seed(2))
    dendro = FiberDendrogram(rows)
    for k in (30, 17, 5):
        assert dendro.cut(dendro.epsilon_for_count(k)).num_fibers <= k
        assert dendro.cut_to_count(k).num_fibers <= k


def test_colored_in_weights_sums_columns_by_color_and_appends_bias():
    w = torch.arange(12.0).reshape(3, 4)
    b = torch.tensor([1.0, 2.0, 3.0])
    hat = colored_in_weights(w, b, torch.tensor([0, 1, 0, 1]))
    expected = torch.stack([w[:, 0] + w[:, 2], w[:, 1] + w[:, 3], b], dim=1).double()
    torch.testing.assert_close(hat, expected)


def test_collapse_identities_against_brute_force():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(7, 9, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64)
    out = FiberPartition(torch.tensor([0, 1, 0, 2, 1, 0, 2]), torch.ones(7, dtype=torch.float64))
    inp = FiberPartition(torch.tensor([0, 0, 1, 2, 3, 1, 3, 4, -1]), torch.ones(9, dtype=torch.float64))
    cw, cb = collapse_weight(w, b, out, inp)
    ref = torch.zeros(3, 5, dtype=torch.float64)
    for c_out in range(3):
        rows = [i for i in range(7) if out.labels[i] == c_out]
        for c_in in range(5):
            cols = [k for k in range(9) if inp.labels[k] == c_in]
            ref[c_out, c_in] = sum(w[i, k] for i in rows for k in cols) / len(rows)  # Eq. (5)
    torch.testing.assert_close(cw, ref)
    torch.testing.assert_close(cb, torch.stack([b[out.labels == c].mean() for c in range(3)]))
    summed = sum_rows(w, out)
    torch.testing.assert_close(summed, torch.stack([w[out.labels == c].sum(0) for c in range(3)]))


def planted_mlp(scale_aware: bool = False, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 24), act(), nn.Linear(24, 16), act(), nn.Linear(16, 3))
    with torch.no_grad():
        rows, truth = planted_rows(8, [3] * 8, 11, seed=4, scales=scale_aware)
        model[0].weight.copy_(rows[:, :10])
        model[0].bias.copy_(rows[:, 10])
        # layer 2: rows equal on the colored inputs, different inside a color (a true fibration, not a copy)
        colored, truth2 = planted_rows(5, [4, 3, 3, 4, 2], 9, seed=5, scales=scale_aware)
        w2 = torch.randn(16, 24) * 0.3
        s = FiberDendrogram(rows, scale_aware=scale_aware).cut(0.0).scales.float()
        for f in range(8):
            members = (truth == f).nonzero().flatten()
            rest = (w2[:, members[:-1]] * s[members[:-1]]).sum(1)
            w2[:, members[-1]] = (colored[:, f] - rest) / s[members[-1]]
        model[2].weight.copy_(w2)
        model[2].bias.copy_(colored[:, 8])
    return model


@pytest.mark.parametrize("scale_aware", [False, True])
def test_mlp_exact_compression_keeps_outputs(scale_aware):
    model = planted_mlp(scale_aware)
    x = torch.randn(64, 10)
    compressed, report = compress_sequential(model, 0.0, scale_aware=scale_aware)
    assert [r.units_after for r in report.layers] == [8, 5, 3]
    torch.testing.assert_close(compressed(x), model(x), atol=1e-5, rtol=1e-5)
    assert count_parameters(compressed) < count_parameters(model)
    assert report.params_after == count_parameters(compressed)


def test_scale_aware_is_refused_for_non_homogeneous_activation():
    with pytest.raises(ValueError, match="positively homogeneous"):
        compress_sequential(planted_mlp(act=nn.Tanh), 0.0, scale_aware=True)


def test_unsupported_layer_is_refused():
    with pytest.raises(ValueError, match="BatchNorm"):
        compress_sequential(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))


def test_more_epsilon_compresses_more_and_changes_outputs_gracefully():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))
    sizes = [compress_sequential(model, eps)[1].layers[0].units_after for eps in (0.0, 0.3, 0.8, 1.5)]
    assert sizes[0] == 64 and all(a >= b for a, b in zip(sizes, sizes[1:], strict=False)) and sizes[-1] < 64


def test_cnn_exact_compression_keeps_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 5),
    )
    with torch.no_grad():
        truth = torch.tensor([0, 1, 2, 0, 3, 1, 4, 0, 2, 5, 3, 1])
        model[0].weight.copy_(model[0].weight[truth])
        model[0].bias.copy_(model[0].bias[truth])
        truth2 = torch.tensor([0, 1, 0, 2, 3, 1, 2, 0])
        w2 = model[2].weight.clone()
        base = torch.randn(4, 12, 3, 3)
        for c in range(12):  # channel c gets base's colored sum split over the members of its fiber
            base_col = base[:, truth[c]] / int((truth == truth[c]).sum())
            w2[:, c] = base_col[truth2]
        model[2].weight.copy_(w2)
        model[2].bias.copy_(model[2].bias[truth2])
    x = torch.randn(4, 2, 8, 8)
    compressed, report = compress_sequential(model, 0.0)
    assert [r.units_after for r in report.layers] == [6, 4, 5]
    torch.testing.assert_close(compressed(x), model(x), atol=1e-5, rtol=1e-5)
    assert count_parameters(compressed) < count_parameters(model)


def test_lstm_exact_compression_keeps_outputs():
    torch.manual_seed(0)
    lstm, head = nn.LSTM(5, 10, batch_first=True), nn.Linear(10, 3)
    truth = torch.tensor([0, 1, 0, 2, 3, 1, 4, 2, 0, 5])
    with torch.no_grad():
        for name in ("weight_ih_l0", "bias_ih_l0", "bias_hh_l0"):
            p = getattr(lstm, name)
            p.copy_(p.reshape(4, 10, *p.shape[1:])[:, truth].reshape(p.shape))
        w_hh = lstm.weight_hh_l0.reshape(4, 10, 10)
        w_hh.copy_(w_hh[:, truth])
    x = torch.randn(3, 7, 5)
    new_lstm, new_head, part = compress_lstm(lstm, head, 0.0)
    assert part.num_fibers == 6 and same_partition(part.labels, truth)
    torch.testing.assert_close(new_head(new_lstm(x)[0]), head(lstm(x)[0]), atol=1e-5, rtol=1e-5)
    assert count_parameters(new_lstm) < count_parameters(lstm)


def test_fiber_linear_repeats_outputs_and_counts_fewer_flops():
    torch.manual_seed(0)
    stack = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 32))
    w = stack[2].weight.detach()
    index = torch.arange(32) % 8
    with torch.no_grad():
        stack[2].weight.copy_(w[index])
        stack[2].bias.copy_(stack[2].bias[index])
    small = FiberLinear.from_weights(stack[2].weight[:8].detach(), stack[2].bias[:8].detach(), index)
    compressed = nn.Sequential(stack[0], stack[1], small)
    x = torch.randn(5, 32)
    torch.testing.assert_close(compressed(x), stack(x))
    assert small.weight.numel() == 8 * 128
    assert count_flops(compressed, x) == 5 * (32 * 128 + 128 * 8)
    assert count_flops(compressed, x) < count_flops(stack, x)


def test_compressed_mlp_counts_fewer_flops():
    model = planted_mlp()
    x = torch.randn(4, 10)
    compressed, _ = compress_sequential(model, 0.0)
    assert count_flops(compressed, x) == 4 * (10 * 8 + 8 * 5 + 5 * 3)
    assert count_flops(model, x) == 4 * (10 * 24 + 24 * 16 + 16 * 3)
