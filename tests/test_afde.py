"""AFDE: the polynomial ODE encoding, the ε-FDE criterion and bound, the lumping, and the transformers path."""

import pytest
import torch
from tiny_models import inputs, plant_fibers, tiny_model

from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.core.afde import (
    ENCODINGS,
    AFDEDendrogram,
    encoding_error,
    lump_mlp,
    mlp_forward,
    ode_trajectory,
    trajectory_mismatch,
)
from hf_fibration.core.fibers import FiberPartition
from hf_fibration.models.surgery import non_embedding_parameters


def _tanh_net(seed: int = 0, n_in: int = 5, hidden: int = 12, n_out: int = 3):
    g = torch.Generator().manual_seed(seed)
    layers = [(torch.randn(hidden, n_in, generator=g, dtype=torch.float64) / n_in ** 0.5,
               0.3 * torch.randn(hidden, generator=g, dtype=torch.float64)),
              (torch.randn(hidden, hidden, generator=g, dtype=torch.float64) / hidden ** 0.5,
               0.3 * torch.randn(hidden, generator=g, dtype=torch.float64)),
              (torch.randn(n_out, hidden, generator=g, dtype=torch.float64) / hidden ** 0.5,
               torch.randn(n_out, generator=g, dtype=torch.float64))]
    x = torch.randn(64, n_in, generator=g, dtype=torch.float64)
    return layers, x


def _planted(seed: int = 0):
    """Units 6..8 of the first layer copy units 0..2 (in-rows, biases and out-columns)."""
    layers, x = _tanh_net(seed)
    (w1, b1), (w2, b2), out = layers
    w1, b1, w2 = w1.clone(), b1.clone(), w2.clone()
    w1[6:9], b1[6:9], w2[:, 6:9] = w1[0:3], b1[0:3], w2[:, 0:3]
    return [(w1, b1), (w2, b2), out], x


def test_planted_exact_blocks_lump_with_equal_function_at_epsilon_zero():
    layers, x = _planted()
    dendro = AFDEDendrogram([layers[0]], layers[1][0], "tanh", x)
    part = dendro.cut(0.0)
    assert part.num_fibers == 9
    lumped = lump_mlp(layers, [part, None])
    assert lumped[0][0].shape == (9, 5) and lumped[1][0].shape == (12, 9)
    torch.testing.assert_close(mlp_forward(lumped, "tanh", x), mlp_forward(layers, "tanh", x), atol=1e-6, rtol=0)
    assert trajectory_mismatch(layers, lumped, "tanh", x) <= 1e-6
    assert dendro.block_bound(part) <= 1e-12


def test_more_epsilon_lumps_more_and_nests():
    layers, x = _tanh_net(1, hidden=24)
    dendro = AFDEDendrogram([layers[0]], layers[1][0], "tanh", x)
    parts = [dendro.cut(eps) for eps in (0.0, 0.1, 0.3, 0.6, 1.0, 1.5, 1.99)]
    counts = [p.num_fibers for p in parts]
    assert counts == sorted(counts, reverse=True) and counts[0] == 24 and counts[-1] < 24
    for fine, coarse in zip(parts, parts[1:], strict=False):
        for c in range(fine.num_fibers):  # every block at a smaller ε lies inside one block at the larger ε
            assert coarse.labels[fine.labels == c].unique().numel() == 1


def test_trajectory_mismatch_is_zero_for_the_identity_and_the_encoding_is_exact():
    layers, x = _tanh_net(2)
    same = lump_mlp(layers, [FiberPartition.identity(12), FiberPartition.identity(12)])
    assert trajectory_mismatch(layers, same, "tanh", x) == 0.0
    for act in ENCODINGS:
        if act != "relu":  # the switched ReLU ODE is integrated across its kink: only first-order accurate
            assert encoding_error(layers, act, x, steps=64) < 1e-5, act
    traj = ode_trajectory(layers, "tanh", x, steps=8)
    torch.testing.assert_close(traj[0], mlp_forward(layers, "tanh", torch.zeros_like(x)))  # the biases


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "gelu", "silu"])
def test_block_bound_holds_along_the_whole_path(act):
    """E_x‖y(s) − ŷ(s)‖ ≤ Σ_B e_B for every s, over the inputs that define the metric (the derivation's claim)."""
    layers, x = _tanh_net(3, hidden=16)
    first, (w2, _), _ = layers
    one_layer = [first, (w2, torch.zeros(w2.shape[0], dtype=torch.float64))]
    dendro = AFDEDendrogram([first], w2, act, x)
    for count in (12, 8, 4, 1):
        part = dendro.cut_to_count(count)
        lumped = lump_mlp(one_layer, [part])
        for s in (0.0, 0.5, 1.0):
            err = (mlp_forward(one_layer, act, s * x) - mlp_forward(lumped, act, s * x)).norm(dim=1).mean()
            assert float(err) <= dendro.block_bound(part) + 1e-12


def test_matching_out_weights_lump_before_matching_nothing():
    """Two pairs with the same in-weight gap: the one whose consumer columns agree (it sees only the block sum)
    merges first; fibers (in-weights alone) cannot tell them apart."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    w[1] = w[0] + 0.2 * torch.randn(6, generator=g, dtype=torch.float64)
    w[3] = w[2] + (w[1] - w[0])
    v = torch.randn(5, 4, generator=g, dtype=torch.float64)
    v[:, 1] = v[:, 0]
    part = AFDEDendrogram([(w, torch.zeros(4, dtype=torch.float64))], v, "tanh").cut_to_count(3)
    assert part.labels[0] == part.labels[1] and part.labels[2] != part.labels[3]


def test_config_accepts_afde_and_names_the_choices():
    assert FibrationConfig(fibers_from="afde").fibers_from == "afde"
    with pytest.raises(ValueError, match="Unknown fibers_from 'afd'.*afde"):
        FibrationConfig(fibers_from="afd")


def test_tiny_transformer_compresses_with_afde():
    model = tiny_model("bert")
    plant_fibers(model)
    batch = inputs(model)
    with torch.no_grad():
        before = model(**batch).logits
    params = non_embedding_parameters(model)
    report = compress_pretrained(model, FibrationConfig(epsilon=0.0, fibers_from="afde", parts=("mlp",)),
                                 progress=False)
    assert report.layers and non_embedding_parameters(model) < params
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, atol=1e-4, rtol=1e-4)


def test_tiny_transformer_searches_with_afde_on_calibration_inputs():
    from test_target import _evalset

    model = tiny_model("gpt2")
    params = non_embedding_parameters(model)
    config = FibrationConfig(target_params=0.7, fibers_from="afde", parts=("mlp",), holdout_fraction=0)
    compress_pretrained(model, config, evalset=_evalset(model), progress=False)
    assert abs(non_embedding_parameters(model) / params - 0.7) <= 0.01


def test_bench_script_few_steps(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    # in its own process: the script fixes torch's threads, and later tests compare logits bit for bit with fresh
    # processes at the default count, which a thread switch in this one can perturb
    scripts = Path(__file__).resolve().parent.parent / "scripts"
    code = (f"import json, sys; sys.path.insert(0, {str(scripts)!r}); import afde_bench; "
            "r = afde_bench.main(['--datasets', 'lorenz', '--seeds', '1', '--hidden', '8', '--steps', '20', "
            f"'--counts', '8', '4', '--out', {str(tmp_path)!r}]); "
            "print(json.dumps({'summary': r['summary'], 'checks': r['checks'], 'methods': afde_bench.METHODS}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    first = result["summary"]["lorenz"][0]
    assert first["units"] == 8 and all(first[m][0] == first["base"][0] for m in result["methods"])
    assert result["checks"]["lorenz"][0]["encoding_error"] < 1e-6
    assert (tmp_path / "mse_vs_units.png").stat().st_size > 1000 and "| 4 |" in (tmp_path / "tables.md").read_text()
