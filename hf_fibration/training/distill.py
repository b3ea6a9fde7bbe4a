"""Distillation from the uncompressed model while retuning: KL(teacher ‖ student)·T² on the logits, mixed with the
task loss, plus an optional relative MSE between hidden states — the last ones, or every layer's (the residual
stream keeps its full width under fibration, so every student layer has a teacher layer to match). Bare encoders
(the fidelity task) have no logits: their task loss already compares with the teacher, and distillation adds the
hidden-state term only.

Memory: the teacher is one more copy of the uncompressed weights on the training device (no gradients, no
optimizer state), and each step runs one extra forward pass without autograd buffers. For fp32 Adam retuning that
is about +25% over the student's own weights + gradients + two Adam moments (4 copies), plus the teacher's
activations of one batch (freed after the step). Pass a teacher in half precision to halve its share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hf_fibration.evaluation.evalset import EvalSet, cosine_gap, encoder_inputs, pool, task_loss

DISTILL_TASKS = ("causal", "seq2seq", "masked")
HIDDEN_LAYERS = ("last", "all")


@dataclass
class Distillation:
    """How the teacher's signal is mixed: loss = (1−weight)·task + weight·KL·T² + hidden_weight·MSE(hidden)."""

    teacher: nn.Module
    weight: float = 0.5
    temperature: float = 2.0
    hidden_weight: float = 0.0
    hidden_layers: str = "last"

    def __post_init__(self) -> None:
        if not 0 <= self.weight <= 1:
            raise ValueError(f"The distillation weight must lie in [0, 1], got {self.weight}.")
        if self.temperature <= 0:
            raise ValueError(f"The distillation temperature must be > 0, got {self.temperature}.")
        if self.hidden_weight < 0:
            raise ValueError(f"hidden_weight must be ≥ 0, got {self.hidden_weight}.")
        if self.hidden_layers not in HIDDEN_LAYERS:
            raise ValueError(f"hidden_layers must be one of {', '.join(HIDDEN_LAYERS)}, got {self.hidden_layers!r}.")

    def prepare(self, task: str, student: nn.Module, device: torch.device) -> None:
        """Check the teacher fits the student and the task, move it to ``device`` and freeze it."""
        if task not in DISTILL_TASKS and not (task == "fidelity" and self.hidden_weight > 0):
            raise ValueError(f"Distillation needs logits (a causal, seq2seq or masked model); this is a {task!r} "
                             "model, whose fidelity loss already compares it with the uncompressed one "
                             "(add hidden-state matching with a hidden weight > 0).")
        t_vocab = getattr(getattr(self.teacher, "config", None), "vocab_size", None)
        s_vocab = getattr(getattr(student, "config", None), "vocab_size", None)
        if t_vocab != s_vocab:
            raise ValueError(f"The teacher's vocabulary ({t_vocab}) differs from the student's ({s_vocab}); "
                             "distill from the model the student was compressed from.")
        self.teacher.to(device).eval()
        self.teacher.requires_grad_(False)

    def loss(self, student: nn.Module, data: EvalSet, index: int) -> torch.Tensor:
        """The mixed loss of one training batch (differentiable in the student)."""
        if self.weight == 0 and self.hidden_weight == 0:
            return task_loss(student, data, index)
        batch = data.batches[index]
        hidden = self.hidden_weight > 0
        if data.task == "fidelity":
            out = student(**encoder_inputs(batch), output_hidden_states=True)
            with torch.no_grad():
                ref = self.teacher(**encoder_inputs(batch), output_hidden_states=True)
            return cosine_gap(pool(out, batch), data.reference[index]).mean() + self.hidden_weight * _hidden_mse(
                ref, out, data.task, batch, self.hidden_layers)
        kwargs = {"use_cache": False} if data.task in ("causal", "seq2seq") else {}
        out = student(**batch, output_hidden_states=hidden, **kwargs)
        with torch.no_grad():
            ref = self.teacher(**batch, output_hidden_states=hidden, **kwargs)
        mask = _positions(data.task, batch)
        total = (1 - self.weight) * out.loss + self.weight * kl_divergence(ref.logits, out.logits, mask,
                                                                           self.temperature)
        if hidden:
            total = total + self.hidden_weight * _hidden_mse(ref, out, data.task, batch, self.hidden_layers)
        return total


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """Mean over the masked positions of KL(softmax(z_t/T) ‖ softmax(z_s/T)), times T² (Hinton et al.)."""
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    per_position = (t.exp() * (t - s)).sum(-1)
    weights = mask.to(per_position)
    return (per_position * weights).sum() / weights.sum().clamp_min(1.0) * temperature ** 2


def _positions(task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Positions whose logits count: the target tokens (seq2seq, masked) or the attended tokens (causal)."""
    if task == "causal":
        return batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    return batch["labels"] != -100


def _hidden_mse(ref, out, task: str, batch: dict[str, torch.Tensor], layers: str = "last") -> torch.Tensor:
    """Relative MSE ‖s − t‖² / ‖t‖² of the hidden states over the non-padding positions, averaged over the matched
    layers: the last one (decoder and encoder for seq2seq) or every layer after the embeddings."""
    chosen = slice(-1, None) if layers == "last" else slice(1, None)
    if task == "seq2seq":
        streams = [("decoder_hidden_states", batch["labels"] != -100),
                   ("encoder_hidden_states", batch["attention_mask"].bool())]
    else:
        streams = [("hidden_states", batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool())]
    pairs = [(t, s, mask) for name, mask in streams
             for t, s in zip(getattr(ref, name)[chosen], getattr(out, name)[chosen], strict=True)]
    total = 0.0
    for t, s, m in pairs:
        w = m.unsqueeze(-1).to(s)
        total = total + (((s - t) ** 2) * w).sum() / ((t ** 2) * w).sum().clamp_min(1e-12)
    return total / len(pairs)
