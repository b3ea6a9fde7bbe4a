"""The offloaded path (blocks resting off the execution device, one at a time on it) gives the in-memory result."""

import copy

import pytest
import torch
from test_compensate import causal_evalset
from tiny_models import plant_fibers, tiny_model

from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.pipeline.offload import streamed_blocks
from hf_fibration.policies.search import greedy_search


@pytest.mark.parametrize("search", ["greedy", "block"])
def test_offloaded_search_equals_the_in_memory_one(search):
    base = tiny_model("llama")
    plant_fibers(base, noise=0.02)
    config = FibrationConfig(tolerance=0.02, parts=("attention", "mlp"), search=search, search_steps=4,
                             holdout_fraction=0.0)
    results = []
    for device in (None, "cpu"):
        model = copy.deepcopy(base)
        report = compress_pretrained(model, config, evalset=causal_evalset(base, n_batches=6), progress=False,
                                     execution_device=device)
        results.append((report.params_after, report.final_loss, model.state_dict()))
    (p0, l0, s0), (p1, l1, s1) = results
    assert p0 == p1 < sum(p.numel() for p in base.parameters())
    assert l0 == l1
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)


def test_one_block_at_a_time_and_hooks_removed():
    model = tiny_model("llama")
    config = FibrationConfig(tolerance=0.02, parts=("mlp",), search_steps=3, holdout_fraction=0.0)
    with streamed_blocks(model, "cpu") as streamer:
        greedy_search(model, config, causal_evalset(model, n_batches=6), progress=False)
        assert streamer.max_resident == 1 and streamer.resident == 0
        calls = streamer.max_resident
    streamer.max_resident = 0
    with torch.no_grad():
        model(input_ids=torch.ones(1, 4, dtype=torch.long))
    assert calls == 1 and streamer.max_resident == 0  # the hooks are gone after the context


def test_cli_offload_writes_the_same_checkpoint(marian_dir, tmp_path):
    from hf_fibration.cli import main

    for name, extra in (("memory", []), ("offload", ["--offload", "--device", "cpu"])):
        assert main(["compress", str(marian_dir), "--tolerance", "0.05", "--max-samples", "16", "--search-steps", "2",
                     "--parts", "mlp", "--output", str(tmp_path / name), "--no-progress", *extra]) == 0
    first, second = ((tmp_path / n / "model.safetensors").read_bytes() for n in ("memory", "offload"))
    assert first == second


def test_cli_offload_refuses_retuning(marian_dir, tmp_path, capsys):
    from hf_fibration.cli import main

    code = main(["compress", str(marian_dir), "--offload", "--retune", "--train-dataset", "x.txt",
                 "--output", str(tmp_path / "o")])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop --offload or --retune" in err[0]
    assert not (tmp_path / "o").exists()


def test_offload_refuses_fisher_pricing(marian_dir, tmp_path, capsys):
    from hf_fibration.cli import main

    with pytest.raises(ValueError, match="block_error='relative'"):
        compress_pretrained(tiny_model("llama"), FibrationConfig(search="block", block_error="fisher"),
                            evalset=causal_evalset(tiny_model("llama")), execution_device="cpu")
    code = main(["compress", str(marian_dir), "--offload", "--search", "block", "--block-error", "fisher",
                 "--output", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "offloaded" in err[0]
    assert not (tmp_path / "o").exists()
