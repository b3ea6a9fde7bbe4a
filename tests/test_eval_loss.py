"""The eval loss read from the head a chunk of labelled tokens at a time equals the model's own loss."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from hf_fibration.evaluation import evalset as E


def _evalset(task: str) -> E.EvalSet:
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(2):
        ids = torch.randint(3, VOCAB, (3, 11), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 8:] = 0  # a padded example
        if task == "causal":
            labels = ids.masked_fill(mask == 0, -100)
        else:
            labels = ids.masked_fill((torch.rand(ids.shape, generator=g) > 0.3) | (mask == 0), -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return E.EvalSet(task, batches, [E.loss_terms(task, b) for b in batches])


@pytest.mark.parametrize("family,task", [("gpt2", "causal"), ("llama", "causal"), ("qwen2", "causal"),
                                         ("bert", "masked")])
def test_chunked_head_loss_equals_the_models_own(family, task, monkeypatch):
    monkeypatch.setattr(E, "HEAD_CHUNK_TOKENS", 4)  # several chunks per batch
    model = tiny_model(family)
    data = _evalset(task)
    assert E._reads_head(model, task)
    head_rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, o: head_rows.append(a[0].shape[0]))
    with torch.no_grad():
        own = [float(model(**b).loss) for b in data.batches]
    expected = sum(loss * w for loss, w in zip(own, data.weights, strict=True)) / data.total_weight
    head_rows.clear()
    assert E.evaluate_loss(model, data) == pytest.approx(expected, rel=1e-5)
    assert head_rows and max(head_rows) <= 4  # the head only ever saw a chunk of labelled tokens
    sums, counts = E.example_losses(model, data)
    assert float(sums.sum() / counts.sum()) == pytest.approx(expected, rel=1e-5)
    assert int(counts.sum()) == data.total_weight


def test_a_head_with_a_bias_added_after_it_reads_the_whole_logits():
    model = tiny_model("marian")  # logits = lm_head(h) + final_logits_bias: the chunked read would miss the bias
    assert not E._reads_head(model, "causal")  # even asked as a causal LM: the table says no
