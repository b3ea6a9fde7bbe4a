import pytest

from hf_fibration import FibrationConfig


def test_round_trip():
    config = FibrationConfig(tolerance=0.02, epsilons={"mlp": 0.3}, parts=("mlp",), linkage="average")
    again = FibrationConfig.from_dict(config.to_dict())
    assert again == config
    assert again.epsilon_for("mlp", "model.layers.0.mlp") == 0.3
    assert again.epsilon_for("attention", "x") is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epsilon": 2.0}, "epsilon must lie in \\[0, 2\\)"),
        ({"epsilon": -0.1}, "epsilon must lie in \\[0, 2\\)"),
        ({"tolerance": -0.01}, "tolerance must be"),
        ({"tolerance": float("nan")}, "tolerance must be"),
        ({"linkage": "ward"}, "Unknown linkage"),
        ({"parts": ("mlp", "lm_head")}, "Unknown parts"),
        ({"epsilon_min": 0.5, "epsilon_max": 0.2}, "must not exceed"),
        ({"epsilons": {"mlp": 3.0}}, "epsilons\\['mlp'\\]"),
        ({"search_order": "random"}, "Unknown search_order"),
        ({"max_eval_samples": 0}, "max_eval_samples"),
    ],
)
def test_bad_values_raise_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        FibrationConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_unknown_field_in_dict():
    with pytest.raises(ValueError, match="Unknown FibrationConfig fields"):
        FibrationConfig.from_dict({"tolerence": 0.1})
