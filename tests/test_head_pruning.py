import copy

import pytest
import torch
from test_merging import calibration
from tiny_models import AUTO_CLASSES, FAMILIES, GENERATES, inputs, tiny_model

import hf_fibration  # noqa: F401  (registers the loader)
from hf_fibration.core.heads import ChannelStats, HeadLayout, flap_allocation, head_scores, uniform_allocation
from hf_fibration.evaluation.evalset import batch_loss_sum
from hf_fibration.methods import baseline_methods
from hf_fibration.methods.baselines import METHODS, PRUNING, compress_to_size
from hf_fibration.models import heads
from hf_fibration.models.heads import HeadSite, build_head_sites, prune_heads
from hf_fibration.models.sites import Site
from hf_fibration.models.surgery import get_module, linear_weight, non_embedding_parameters
from hf_fibration.repair.calibration import capture_calibration

pytestmark = pytest.mark.usefixtures("one_thread")


def wide_model(family: str):
    """The tiny model with an MLP 4× the width (as in real transformers), so that MLP-only methods reach 50%."""
    config = tiny_model(family).config
    for key in ("intermediate_size", "encoder_ffn_dim", "decoder_ffn_dim"):
        if getattr(config, key, None) is not None:
            setattr(config, key, 128)
    torch.manual_seed(0)
    return type(tiny_model(family))(config).eval()


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def attention_params(model) -> int:
    return sum(s.params(model) for s in build_head_sites(model))


def test_head_layout_groups_query_heads_with_their_key_value_head():
    layout = HeadLayout(num_heads=4, num_kv_heads=2, head_dim=3)
    assert layout.units == 2 and layout.group == 2
    assert layout.query_channels(torch.tensor([1])).tolist() == list(range(6, 12))
    assert layout.kv_channels(torch.tensor([1])).tolist() == [3, 4, 5]
    assert layout.unit_of_query_channel().tolist() == [0] * 6 + [1] * 6
    with pytest.raises(ValueError, match="cannot share"):
        HeadLayout(4, 3, 8)


def test_head_scores_see_the_heads_weights_and_inputs():
    g = torch.Generator().manual_seed(0)
    layout = HeadLayout(num_heads=3, num_kv_heads=3, head_dim=2)
    q, k, v = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3))
    out = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x = torch.randn(100, 6, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1.0, 5.0, 5.0, 1.0, 1.0])
    stats = ChannelStats.of(x)
    for rows in (q, k, v):
        rows[4:] = 0  # unit 2 reads nothing
    out[:, 0:2] = 0  # unit 0 writes nothing
    for criterion in ("l1", "l2"):
        assert int(head_scores(criterion, layout, (q, k, v), out, stats).argmin()) == 2
    assert head_scores("magnitude", layout, (q, k, v), out, stats)[[0, 2]].tolist() == [0, 0]
    for criterion in ("wanda-sp", "flap"):  # the output columns and their inputs only; unit 1's inputs are loud
        scores = head_scores(criterion, layout, (q, k, v), out, stats)
        assert scores[0] == 0 and scores[2] > 0 and int(scores.argmax()) == 1
    manual = (out.abs().sum(0) * x.norm(dim=0)).reshape(3, 2).sum(1)
    torch.testing.assert_close(head_scores("wanda-sp", layout, (q, k, v), out, stats), manual)
    flap = ((x.var(0) * (out**2).sum(0)) ** 2).reshape(3, 2).mean(1)
    torch.testing.assert_close(head_scores("flap", layout, (q, k, v), out, stats), flap)
    with pytest.raises(ValueError, match="calibration"):
        head_scores("flap", layout, (q, k, v), out)


def test_flap_allocation_ranks_globally_and_fills_the_budget():
    heads_scores, mlp_scores = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 0.8, 0.1, -0.5, -2.0])
    # heads cost 10, MLP units 1; the best of each site is always kept (10 + 1), 9 left: the 0.5 head does not
    # fit, so the MLP units after it fill in, best first
    assert flap_allocation([heads_scores, mlp_scores], [10, 1], 20) == [1, 5]
    assert flap_allocation([heads_scores, mlp_scores], [10, 1], 22) == [2, 2]
    assert flap_allocation([heads_scores, mlp_scores], [10, 1], 0) == [1, 1]


def test_uniform_allocation_lands_within_one_unit():
    units, costs, coarse = [4, 64, 4, 64], [100, 7, 100, 7], [True, False, True, False]
    counts, f, g = uniform_allocation(units, costs, coarse, 700)
    total = sum(c * k for c, k in zip(costs, counts, strict=True))
    assert abs(total - 700) <= 7 and counts[0] == counts[2] == round(f * 4) and abs(counts[1] - counts[3]) <= 1
    assert abs(counts[1] / 64 - g) <= 1 / 64


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_method_lands_within_one_percent_of_half(family):
    base = wide_model(family)
    calib, batch = calibration(base), inputs(base)
    before, attention = non_embedding_parameters(base), attention_params(base)
    for method in METHODS:
        model = copy.deepcopy(base)
        report = compress_to_size(model, method, 0.5, calib)
        kept = non_embedding_parameters(model) / before
        assert abs(kept - 0.5) <= 0.005, (method, kept)
        assert report.non_embedding_params_after == non_embedding_parameters(model)
        if method in PRUNING:
            assert attention_params(model) < attention
        else:  # heads left whole: MLP-only at the same size
            assert attention_params(model) == attention
        assert torch.isfinite(logits(model, batch)).all()


def test_mlp_only_methods_say_when_the_size_is_out_of_reach():
    model = tiny_model("bert")  # its MLP is too narrow to hold half the parameters
    with pytest.raises(ValueError, match="MLP units only"):
        compress_to_size(model, "zipit", 0.5, calibration(model))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruned_checkpoint_reloads_with_identical_outputs(family, tmp_path):
    base = tiny_model(family)
    calib, batch = calibration(base), inputs(base)
    for method, compensate in (("flap", False), ("wanda-sp", True)):
        model = copy.deepcopy(base)
        compress_to_size(model, method, 0.6, calib, compensate=compensate)
        model.save_pretrained(tmp_path / method)
        loaded = AUTO_CLASSES[family].from_pretrained(tmp_path / method).eval()
        assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in base.parameters())
        assert attention_params(loaded) < attention_params(base)
        torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=0, rtol=0)
        if family in GENERATES:  # the key/value cache runs on the narrowed heads
            kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
            assert torch.equal(loaded.generate(**batch, **kwargs), model.generate(**batch, **kwargs))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_keeping_every_head_leaves_outputs_unchanged(family):
    model = tiny_model(family)
    batch = inputs(model)
    reference = logits(model, batch)
    for site in build_head_sites(model):
        site.apply(model, torch.arange(site.units()))  # a score that keeps all heads
    torch.testing.assert_close(logits(model, batch), reference, atol=1e-5, rtol=1e-5)
    untouched = tiny_model(family)
    report = compress_to_size(untouched, "l2", 1.0, calibration(untouched))
    assert report.layers == [] and torch.equal(logits(untouched, batch), reference)


def output_inputs(model, site: HeadSite, calib) -> torch.Tensor:
    """What enters the site's output projection on the calibration batches (float64)."""
    probe = Site(site.out, "attention", "rows", (site.out,))
    return capture_calibration(model, probe, lambda i: batch_loss_sum(model, calib, i), len(calib.batches),
                               10**6).inputs


def projection(model, name: str, x: torch.Tensor) -> torch.Tensor:
    w, b = linear_weight(get_module(model, name))
    return x @ w.to(torch.float64).T + (0 if b is None else b.to(torch.float64))


@pytest.mark.parametrize("family", ["bert", "llama"])  # an output projection with a bias, and one without
def test_flap_bias_compensation_moves_the_mean_of_the_removed_heads(family, monkeypatch):
    model = tiny_model(family)
    calib = calibration(model)
    plain = copy.deepcopy(model)
    site, plain_site = build_head_sites(model)[0], build_head_sites(plain)[0]
    layout = site.layout
    x = output_inputs(model, site, calib)
    original = projection(model, site.out, x)
    prune_heads(model, site, "flap", 1, calib)
    with monkeypatch.context() as patch:
        patch.setattr(heads, "shift_bias", lambda *args: None)
        prune_heads(plain, plain_site, "flap", 1, calib)
    assert torch.equal(site.kept, plain_site.kept)
    kept = x[:, layout.query_channels(site.kept)]
    errors = {name: projection(m, site.out, kept) - original for name, m in (("flap", model), ("plain", plain))}
    # the compensated projection is right on average over the calibration tokens, and closer
    torch.testing.assert_close(errors["flap"].mean(0), torch.zeros_like(original[0]), atol=1e-5, rtol=0)
    assert errors["plain"].mean(0).abs().max() > 1e-3  # there was a mean to move
    assert (errors["flap"] ** 2).mean() < (errors["plain"] ** 2).mean()


def test_flap_compensation_brings_the_model_closer_on_the_calibration_data(monkeypatch):
    base = wide_model("bert")
    calib = calibration(base)

    def hidden_error(model) -> float:
        with torch.no_grad():
            return sum(float(((model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                               - base(**{k: v for k, v in batch.items() if k != "labels"}).logits) ** 2).mean())
                       for batch in calib.batches)

    compensated = copy.deepcopy(base)
    compress_to_size(compensated, "flap", 0.5, calib)
    plain = copy.deepcopy(base)
    with monkeypatch.context() as patch:
        patch.setattr(heads, "shift_bias", lambda *a: None)
        patch.setattr(baseline_methods, "shift_bias", lambda *a: None)
        compress_to_size(plain, "flap", 0.5, calib)
    assert hidden_error(compensated) < hidden_error(plain)
