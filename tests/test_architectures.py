"""The architecture table is the one reader of family details: its activation column is what the MLPs compute."""

import pytest
import torch
from tiny_models import FAMILIES, inputs, tiny_model

from hf_fibration import FibrationConfig
from hf_fibration.core.compensate import mlp_hidden
from hf_fibration.models.architectures import mlp_activation
from hf_fibration.models.sites import build_sites
from hf_fibration.models.surgery import get_module, linear_weight


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_tables_activation_rebuilds_each_mlps_output(family):
    model = tiny_model(family)
    site = next(s for s in build_sites(model, FibrationConfig(parts=("mlp",))) if s.kind == "mlp")
    seen = {}
    hooks = [get_module(model, site.modules[0]).register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0])),
             get_module(model, site.modules[-1]).register_forward_hook(lambda m, a, o: seen.setdefault("y", o))]
    with torch.no_grad():
        model(**inputs(model))
    for h in hooks:
        h.remove()
    _, act = mlp_activation(model)
    hidden = mlp_hidden(seen["x"], [linear_weight(get_module(model, m)) for m in site.modules_in()], act)
    weight, bias = linear_weight(get_module(model, site.modules[-1]))
    torch.testing.assert_close(hidden @ weight.T + (0 if bias is None else bias), seen["y"])


def test_an_unknown_activation_is_one_line_that_says_what_to_set():
    model = tiny_model("llama")
    model.config.hidden_act = "no-such-activation"
    with pytest.raises(ValueError, match=r"config\.hidden_act = 'no-such-activation'.*ACT2FN"):
        mlp_activation(model)
