"""Hidden-state distillation for bare encoders (the fidelity task): every layer's residual stream is matched."""

import copy

import torch
import transformers as T

from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.evaluation.evalset import EvalSet, embed, encoder_inputs
from hf_fibration.training.distill import _hidden_mse
from hf_fibration.training.retune import retune


def _encoder_pair():
    torch.manual_seed(0)
    teacher = T.BertModel(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=64,
                                       initializer_range=0.3)).eval()
    ids = torch.randint(3, 64, (4, 8, 10), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids]
    with torch.no_grad():
        reference = [embed(teacher, b) for b in batches]
    data = EvalSet("fidelity", batches, [len(b) for b in ids], reference=reference)
    student = copy.deepcopy(teacher)
    compress_pretrained(student, FibrationConfig(epsilon=1.5, parts=("mlp",), compensate=False))
    student.requires_grad_(True)
    return teacher, student, data


def _layer_mismatch(teacher, student, data) -> float:
    with torch.no_grad():
        return sum(float(_hidden_mse(teacher(**encoder_inputs(b), output_hidden_states=True),
                                     student(**encoder_inputs(b), output_hidden_states=True), "fidelity", b, "all"))
                   for b in data.batches)


def test_every_layer_matching_pulls_the_hidden_states_to_the_teacher():
    teacher, student, data = _encoder_pair()
    plain = copy.deepcopy(student)
    before = _layer_mismatch(teacher, student, data)
    assert before > 0
    retune(student, data, data, epochs=4, learning_rate=3e-3, patience=10, progress=False, teacher=teacher,
           distill_hidden_weight=1.0, distill_hidden_layers="all")
    retune(plain, data, data, epochs=4, learning_rate=3e-3, patience=10, progress=False)
    assert _layer_mismatch(teacher, student, data) < 0.7 * before
    assert _layer_mismatch(teacher, student, data) < _layer_mismatch(teacher, plain, data)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_hidden_mse_is_relative_and_zero_for_the_teacher_itself():
    teacher, _, data = _encoder_pair()
    b = data.batches[0]
    with torch.no_grad():
        out = teacher(**b, output_hidden_states=True)
        scaled = copy.copy(out)
        scaled.hidden_states = tuple(2 * h for h in out.hidden_states)
    assert float(_hidden_mse(out, out, "fidelity", b, "all")) == 0.0
    assert abs(float(_hidden_mse(out, scaled, "fidelity", b, "all")) - 1.0) < 1e-5  # ‖2t − t‖² / ‖t‖² = 1


def test_cli_distill_adds_every_layer_matching_for_encoders_only():
    import argparse

    from hf_fibration.cli import _retune_kwargs

    args = argparse.Namespace(epochs=1, lr=1e-4, patience=1, mixed_precision="no", distill=True, distill_weight=0.5,
                              distill_temperature=2.0, distill_hidden_weight=None, distill_layers="all")
    teacher = object()
    encoder = _retune_kwargs(args, teacher, "fidelity")
    assert encoder["teacher"] is teacher and encoder["distill_hidden_weight"] == 1.0
    assert encoder["distill_hidden_layers"] == "all"
    assert _retune_kwargs(args, teacher, "causal")["distill_hidden_weight"] == 0.0
    args.distill_hidden_weight = 0.0
    assert "teacher" not in _retune_kwargs(args, teacher, "fidelity")
