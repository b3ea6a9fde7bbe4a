import json

import pytest

from hf_fibration.integrations.publish import read_record
from hf_fibration.integrations.run_record import REPORT_FILE, RunRecord

# The keys `hf-fibration compress` writes, in its order.
COMPRESS_KEYS = ["base_model", "source", "command", "task", "dataset", "dataset_config", "split", "seconds", "config",
                 "report", "metrics", "rounds", "metrics_on", "base_card", "holdout_examples"]


def _compress_record() -> dict:
    return {"base_model": "org/base", "source": "/models/base", "command": "hf-fibration compress /models/base",
            "task": "fidelity", "dataset": None, "dataset_config": None, "split": None, "seconds": 1.5,
            "config": {"tolerance": 0.01}, "report": {"layers": [], "params_after": 10},
            "metrics": {"before": {"loss": 0.0}, "after": {"loss": 0.01}}, "rounds": None,
            "metrics_on": "eval set", "base_card": {}, "holdout_examples": None}


def test_a_compress_record_round_trips_key_for_key():
    data = _compress_record()
    record = RunRecord.from_dict(data)
    assert record.task == "fidelity" and record.metrics["after"]["loss"] == 0.01 and not record.plain
    assert list(record.to_dict()) == COMPRESS_KEYS and record.to_dict() == data
    assert list(RunRecord().to_dict()) == COMPRESS_KEYS  # the steps after compress add their keys once they ran


def test_later_steps_and_unknown_keys_are_written_back_after_the_compress_keys():
    data = {**_compress_record(), "retune": {"steps": 3}, "exported_from": "/x", "plain": True, "future": 1}
    record = RunRecord.from_dict(data)
    assert record.retune == {"steps": 3} and record.plain and record.extra == {"future": 1}
    assert record.to_dict() == data and list(record.to_dict()) == list(data)


def test_load_and_read_record(tmp_path):
    assert RunRecord.load(tmp_path) is None
    (tmp_path / REPORT_FILE).write_text(json.dumps(_compress_record()))
    assert read_record(tmp_path) == RunRecord.from_dict(_compress_record())
    (tmp_path / REPORT_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON; restore it or delete it"):
        read_record(tmp_path)
    (tmp_path / REPORT_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds no JSON object"):
        RunRecord.load(tmp_path)


def test_read_record_falls_back_on_the_quantization_config(tmp_path):
    quant = {"quant_method": "fibration", "base_model": "/models/base", "fibration": {"epsilon": 0.1},
             "report": {"params_after": 10}}
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                      "quantization_config": quant}))
    record = read_record(tmp_path)
    assert record.task == "causal" and record.source == "/models/base" and record.base_model is None
    assert record.config == {"epsilon": 0.1} and record.report == {"params_after": 10, "layers": []}
    assert record.metrics == {} and record.dataset is None and record.command is None
