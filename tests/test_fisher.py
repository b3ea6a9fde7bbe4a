"""The sampled Fisher prices a block-output error in loss units: ½ Σ F·δ² predicts the loss increase of a small
perturbation δ of one block's output (to second order, for random δ whose coordinates are independent)."""

import copy

import pytest
import torch
import transformers as T

from hf_fibration import FibrationConfig
from hf_fibration.evaluation.evalset import EvalSet, embed, evaluate_loss
from hf_fibration.pipeline.blocks import stacks_of
from hf_fibration.pipeline.fisher import output_fisher
from hf_fibration.policies.block_search import block_search


def _bert_fidelity():
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, initializer_range=0.3)).eval()
    ids = torch.randint(3, 64, (6, 8, 10), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids]
    with torch.no_grad():
        reference = [embed(model, b) for b in batches]
    return model, EvalSet("fidelity", batches, [len(b) for b in ids], reference=reference)


def _perturbed_loss(model, evalset, block, noise):
    calls = iter(noise)
    handle = block.register_forward_hook(lambda m, a, out: (out[0] + next(calls),) + tuple(out[1:])
                                         if isinstance(out, tuple) else out + next(calls))
    try:
        return evaluate_loss(model, evalset)
    finally:
        handle.remove()


@pytest.mark.parametrize("block_index", [0, 1])
def test_half_fisher_times_squared_error_predicts_the_fidelity_loss_increase(block_index):
    model, evalset = _bert_fidelity()
    stacks, _ = stacks_of(model)
    blocks = {(0, b): block for b, block in enumerate(stacks[0])}
    fisher = output_fisher(model, evalset, blocks, seed=0)[(0, block_index)]
    assert [f.shape for f in fisher] == [(8, 10, 32)] * 6 and all(bool((f >= 0).all()) for f in fisher)
    g = torch.Generator().manual_seed(1)
    predicted, measured = [], []
    for _ in range(4):
        noise = [1e-2 * torch.randn(f.shape, generator=g) for f in fisher]
        predicted.append(0.5 * sum(float((f * n.pow(2)).sum()) for f, n in zip(fisher, noise, strict=True))
                         / evalset.total_weight)
        measured.append(_perturbed_loss(model, evalset, stacks[0][block_index], noise))
    ratio = sum(predicted) / sum(measured)
    assert 0.5 < ratio < 2.0, ratio  # one Fisher sample per example: right to within its sampling noise


def test_frozen_weights_still_give_a_fisher_and_stay_frozen():
    model, evalset = _bert_fidelity()
    model.requires_grad_(False)
    stacks, _ = stacks_of(model)
    fisher = output_fisher(model, evalset, {(0, 0): stacks[0][0]})[(0, 0)]
    assert sum(float(f.sum()) for f in fisher) > 0
    assert not any(p.requires_grad for p in model.parameters())


def test_the_fisher_priced_block_search_keeps_the_bound():
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=96,
                                             max_position_embeddings=64)).eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(3, 64, (4, 12), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    evalset = EvalSet("causal", batches, [4 * 11] * 4)
    config = FibrationConfig(tolerance=0.02, compensate=False, block_error="fisher", holdout_fraction=0.0)
    compressed = copy.deepcopy(model)
    report = block_search(compressed, config, evalset, progress=False)
    assert report.final_loss <= report.base_loss * 1.02
    assert report.final_loss == pytest.approx(evaluate_loss(compressed, evalset))
    assert report.non_embedding_params_after < report.non_embedding_params_before
