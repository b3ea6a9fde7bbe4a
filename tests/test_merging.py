import copy

import pytest
import torch
from tiny_models import AUTO_CLASSES, FAMILIES, _rows, inputs, tiny_model

import hf_fibration  # noqa: F401  (registers the loader)
from hf_fibration import FibrationConfig
from hf_fibration.core.merging import (
    activation_correlation,
    fold_repair_scales,
    folding_features,
    inout_rows,
    kmeans,
    zipit_labels,
)
from hf_fibration.evaluation.evalset import EvalSet
from hf_fibration.methods.baselines import ABLATIONS, MERGING, compress_mlps
from hf_fibration.models.sites import build_sites
from hf_fibration.models.surgery import get_module

NEW = MERGING + ABLATIONS


pytestmark = pytest.mark.usefixtures("one_thread")


def planted_groups(n: int = 60, k: int = 12, dim: int = 24, noise: float = 1e-3, seed: int = 0):
    """Rows that are noisy copies of k prototypes, in groups of unequal sizes; returns (rows, group of each row)."""
    g = torch.Generator().manual_seed(seed)
    group = torch.cat([torch.arange(k), torch.randint(k, (n - k,), generator=g)])[torch.randperm(n, generator=g)]
    prototypes = torch.randn(k, dim, generator=g, dtype=torch.float64)
    rows = prototypes[group] * (1 + noise * torch.randn(n, 1, generator=g, dtype=torch.float64))
    return rows + noise * torch.randn(n, dim, generator=g, dtype=torch.float64), group


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a[:, None] == a[None, :]) == (b[:, None] == b[None, :])).all())


def test_kmeans_finds_the_planted_groups_at_the_planted_count():
    rows, group = planted_groups()
    labels = kmeans(rows, 12)
    assert int(labels.max()) + 1 == 12 and same_partition(labels, group)


def test_folding_features_see_input_rows_and_consumer_columns():
    rows, group = planted_groups(dim=16)
    up, gate, down = rows[:, :8], rows[:, 8:12], rows[:, 12:].T
    features = folding_features([gate, up], down)
    assert features.shape == (60, 16)
    assert same_partition(kmeans(features, 12), group)
    down = down.clone()
    down[:, group == 0] = torch.randn(4, int((group == 0).sum()), dtype=torch.float64) * 10  # columns now differ
    assert not same_partition(kmeans(folding_features([gate, up], down), 12), group)


def test_zipit_matches_the_planted_pairs_by_activation_correlation():
    g = torch.Generator().manual_seed(0)
    signals = torch.randn(2000, 10, generator=g, dtype=torch.float64)
    partner = torch.randperm(20, generator=g)
    group = torch.empty(20, dtype=torch.long)
    group[partner] = torch.arange(20) // 2
    hidden = signals[:, group] * torch.rand(20, generator=g, dtype=torch.float64).add(0.5)  # positive rescales
    hidden = hidden + 0.01 * torch.randn(hidden.shape, generator=g, dtype=torch.float64) + 3.0
    labels = zipit_labels(activation_correlation(hidden), 10)
    assert int(labels.max()) + 1 == 10 and same_partition(labels, group)


def test_zipit_alpha_spreads_merges_over_pairs():
    corr = torch.tensor([[1.0, 0.9, 0.8, 0.0], [0.9, 1.0, 0.85, 0.0], [0.8, 0.85, 1.0, 0.5], [0.0, 0.0, 0.5, 1.0]])
    assert zipit_labels(corr, 2, alpha=1.0).tolist() == [0, 0, 0, 1]  # plain complete linkage
    assert zipit_labels(corr, 2, alpha=0.3).tolist() == [0, 0, 1, 1]  # the merged pair waits


def test_inout_rows_average_the_in_and_out_cosines():
    g = torch.Generator().manual_seed(0)
    w_in = torch.randn(5, 7, generator=g, dtype=torch.float64)
    w_out = torch.randn(3, 5, generator=g, dtype=torch.float64)
    rows = inout_rows(w_in, w_out)

    def cos(m):
        m = m / m.norm(dim=1, keepdim=True)
        return m @ m.T

    torch.testing.assert_close(cos(rows), (cos(w_in) + cos(w_out.T)) / 2)


def test_fold_repair_scales():
    g = torch.Generator().manual_seed(0)
    orthogonal = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0][:4]
    same = torch.randn(1, 8, generator=g, dtype=torch.float64).repeat(3, 1) * torch.tensor([[1.0], [2.0], [0.5]])
    rows = torch.cat([orthogonal, same, torch.randn(1, 8, generator=g, dtype=torch.float64)])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    torch.testing.assert_close(fold_repair_scales(rows, labels), torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64))
    c = 0.3  # two rows at cosine c: sqrt(2 / (1 + c))
    pair = torch.tensor([[1.0, 0.0], [c, (1 - c * c) ** 0.5]], dtype=torch.float64)
    torch.testing.assert_close(fold_repair_scales(pair, torch.tensor([0, 0])),
                               torch.tensor([(2 / (1 + c)) ** 0.5], dtype=torch.float64))


def calibration(model) -> EvalSet:
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(3, 64, (4, 12), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        if model.config.is_encoder_decoder:
            batch["labels"] = torch.randint(3, 64, (4, 7), generator=g)
        batches.append(batch)
    task = "masked" if model.config.model_type == "bert" else "causal"
    task = "seq2seq" if model.config.is_encoder_decoder else task
    return EvalSet(task, batches, [48, 48])


@torch.no_grad()
def plant_unit_pairs(model) -> int:
    """In every MLP, a quarter of the units get an exact twin (input rows, biases and consumer column copied):
    merging exactly these pairs leaves the model's outputs unchanged. Returns the planted unit count per MLP."""
    count = 0
    for site in [s for s in build_sites(model, FibrationConfig(parts=("mlp",))) if s.kind == "mlp"]:
        for name in site.modules_in():
            module = get_module(model, name)
            rows = _rows(module)
            n = rows.shape[0]
            rows[n // 2: n // 2 + n // 4] = rows[: n // 4].clone()
            if module.bias is not None:
                module.bias[n // 2: n // 2 + n // 4] = module.bias[: n // 4].clone()
        cols = _rows(get_module(model, site.modules[-1])).T
        cols[n // 2: n // 2 + n // 4] = cols[: n // 4].clone()
        count = n - n // 4
    return count


@pytest.mark.parametrize("method", NEW)
def test_each_merging_method_merges_exactly_the_planted_pairs(method):
    model = tiny_model("llama")
    planted = plant_unit_pairs(model)
    batch = inputs(model)
    with torch.no_grad():
        reference = model(**batch).logits
    report = compress_mlps(model, method, planted / 64, calibration(model))
    assert [r.units_after for r in report.layers] == [planted] * 2
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_reloads_after_each_new_method(family, tmp_path):
    base = tiny_model(family)
    calib = calibration(base)
    batch = inputs(base)
    for i, method in enumerate(NEW):
        model = copy.deepcopy(base)
        compress_mlps(model, method, 0.5, calib, compensate=i % 2 == 1)
        with torch.no_grad():
            logits = model(**batch).logits
        model.save_pretrained(tmp_path / method)
        loaded = AUTO_CLASSES[family].from_pretrained(tmp_path / method).eval()
        assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in base.parameters())
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, logits, atol=0, rtol=0)
