import copy

import pytest
import torch
from test_compensate import causal_evalset
from test_head_pruning import attention_params, wide_model
from test_merging import calibration

from hf_fibration.core.fibers import FiberPartition
from hf_fibration.core.selection import keep_top
from hf_fibration.methods.baseline_methods import BASELINE_METHODS, register_baseline_method
from hf_fibration.methods.baselines import (
    ABLATIONS,
    FIBRATION,
    MERGING,
    METHODS,
    PRUNING,
    compress_mlps,
    compress_to_size,
)
from hf_fibration.models.surgery import get_module, linear_weight, non_embedding_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_built_in_methods_keep_their_names_and_order():
    assert PRUNING == ("random", "l1", "l2", "magnitude", "wanda-sp", "flap")
    assert MERGING == ("model-folding", "zipit")
    assert FIBRATION == ("fibration-weights", "fibration-activations", "fibration-span", "fibration-afde")
    assert ABLATIONS == ("fibration-inout", "fibration-kmeans", "fibration-repair")
    assert METHODS == PRUNING + MERGING + FIBRATION + ABLATIONS == tuple(BASELINE_METHODS)[:len(METHODS)]
    assert all(BASELINE_METHODS[m].head_score == m for m in PRUNING)
    assert [m for m in METHODS if BASELINE_METHODS[m].repair] == ["model-folding", "fibration-repair"]


def test_a_registered_method_runs_through_both_loops():
    calls = []

    def first_units(ctx):
        calls.append("partition")
        assert ctx.hidden.shape == (ctx.inputs.shape[0], ctx.down.shape[1])
        return keep_top(-torch.arange(ctx.down.shape[1], dtype=torch.float64), ctx.k)

    register_baseline_method("first-units", "Keep the first k units.", first_units, kind="pruning", head_score="l2",
                             repair=lambda ctx, p: calls.append("repair"),
                             bias_shift=lambda ctx, p: calls.append("bias"))
    try:
        base = wide_model("llama")
        down = "model.layers.0.mlp.down_proj"
        for compensate in (False, True):
            calls.clear()
            model = copy.deepcopy(base)
            report = compress_mlps(model, "first-units", 0.5, causal_evalset(base, 12), compensate=compensate)
            assert [(r.units_before, r.units_after) for r in report.layers] == [(128, 64)] * 2
            assert calls == ["partition", "repair"] * 2 if compensate else ["partition", "repair", "bias"] * 2
            if not compensate:  # the plain collapse keeps the first 64 consumer columns as they were
                torch.testing.assert_close(linear_weight(get_module(model, down))[0],
                                           linear_weight(get_module(base, down))[0][:, :64])
        model = copy.deepcopy(base)
        compress_to_size(model, "first-units", 0.5, calibration(base))
        assert abs(non_embedding_parameters(model) / non_embedding_parameters(base) - 0.5) <= 0.005
        assert attention_params(model) < attention_params(base)  # its head score prunes heads too
        assert model.config.quantization_config.fibration["method"] == "first-units"
        with pytest.raises(ValueError, match="already registered"):
            register_baseline_method("first-units", "again", first_units, kind="pruning")
    finally:
        BASELINE_METHODS.pop("first-units", None)
    with pytest.raises(ValueError, match="Unknown method"):
        compress_mlps(copy.deepcopy(base), "first-units", 0.5, calibration(base))


def test_a_registered_method_without_a_head_score_leaves_heads_whole():
    def modulo(ctx):  # unit i joins unit i mod k
        labels = torch.arange(ctx.down.shape[1]) % ctx.k
        return FiberPartition(labels, torch.ones(labels.numel(), dtype=torch.float64))

    register_baseline_method("modulo", "Merge the units congruent modulo k.", modulo, kind="merging")
    try:
        base = wide_model("gpt2")
        model = copy.deepcopy(base)
        report = compress_to_size(model, "modulo", 0.5, calibration(base))
        assert abs(non_embedding_parameters(model) / non_embedding_parameters(base) - 0.5) <= 0.005
        assert attention_params(model) == attention_params(base)
        assert all(r.units_after < r.units_before for r in report.layers)
    finally:
        BASELINE_METHODS.pop("modulo", None)
    with pytest.raises(ValueError, match="Unknown kind"):
        register_baseline_method("odd", "?", lambda ctx: None, kind="quantization")
