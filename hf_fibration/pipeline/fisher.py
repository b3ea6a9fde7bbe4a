"""How much the eval loss cares about each coordinate of each block's output: the diagonal of the sampled Fisher
(the Gauss–Newton curvature of the loss), per token, from one backward pass.

A perturbation δ of block b's output raises the loss by about ½ Σ_t Σ_i F_ti δ_ti², where F_ti = E[g_ti²] and g is
the gradient of the loss with its targets drawn from the model itself: next-token (or masked, or target-side) labels
sampled from the model's own softmax, and, for the sentence-embedding fidelity loss (1 − cos, whose gradient at the
uncompressed model is zero but whose curvature is not: 1 − cos ≈ ½‖Δe‖²), a random Gaussian direction v in the
embedding space (E[(v·Δe)²] = ‖Δe‖²). One sample per token; averaged over thousands of tokens it prices a block
error in units of the loss, so errors of different blocks (and of different output directions) become comparable.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_fibration.evaluation.evalset import EvalSet, embed
from hf_fibration.pipeline.blocks import first_output


def _sampled_objective(model: nn.Module, evalset: EvalSet, index: int, generator: torch.Generator) -> torch.Tensor:
    """The loss whose gradient is one Fisher sample: Σ log p(ŷ) with ŷ drawn from the model, or Σ v·e."""
    batch = evalset.batches[index]
    if evalset.task == "fidelity":
        pooled = embed(model, batch)
        direction = torch.randn(pooled.shape, generator=generator, dtype=torch.float32).to(pooled)
        return (pooled * direction).sum()
    kwargs = {"use_cache": False} if evalset.task in ("causal", "seq2seq") else {}
    logits, labels = model(**batch, **kwargs).logits, batch["labels"]
    if evalset.task == "causal":
        logits, labels = logits[:, :-1], labels[:, 1:]
    picked = logits[labels != -100].float()
    if picked.numel() == 0:
        return logits.sum() * 0.0
    log_probs = torch.log_softmax(picked, dim=-1)
    drawn = torch.multinomial(log_probs.detach().exp().cpu(), 1, generator=generator).to(picked.device)
    return log_probs.gather(1, drawn).sum()


def output_fisher(model: nn.Module, evalset: EvalSet, blocks: dict[tuple[int, int], nn.Module], seed: int = 0
                  ) -> dict[tuple[int, int], list[torch.Tensor]]:
    """Per block (keyed as ``blocks``) and eval batch: F = g² for the gradient g of one sampled objective with
    respect to the block's output (batch × sequence × hidden, float32, on the CPU)."""
    generator = torch.Generator().manual_seed(seed)
    fisher: dict[tuple[int, int], list[torch.Tensor]] = {key: [] for key in blocks}
    outputs: dict[tuple[int, int], torch.Tensor] = {}

    def keep(key: tuple[int, int]):
        def hook(module: nn.Module, args: tuple, out: object) -> None:
            outputs[key] = first_output(out)

        return hook

    handles = [block.register_forward_hook(keep(key)) for key, block in blocks.items()]
    frozen = [p for p in model.parameters() if p.is_floating_point() and not p.requires_grad]
    for p in frozen:  # the block outputs need a graph; only their gradients are computed, never the weights'
        p.requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        for i in range(len(evalset.batches)):
            outputs.clear()
            with torch.enable_grad():
                objective = _sampled_objective(model, evalset, i, generator)
                keys = [k for k in blocks if k in outputs and outputs[k].requires_grad]
                grads = torch.autograd.grad(objective, [outputs[k] for k in keys], allow_unused=True) if keys else []
            for key, grad in zip(keys, grads, strict=True):
                shape = outputs[key].shape
                fisher[key].append(torch.zeros(shape) if grad is None else grad.detach().float().pow(2).cpu())
    finally:
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(False)
        for handle in handles:
            handle.remove()
    return fisher

