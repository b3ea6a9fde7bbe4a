"""What the training scripts (train_lm.py, train_multi30k.py) say about a model and write when a run ends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from hf_fibration.evaluation.results_io import write_json
from hf_fibration.models.surgery import non_embedding_parameters


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"parameters": all of ``model``'s, "non_embedding_parameters": those outside its embeddings}."""
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "non_embedding_parameters": non_embedding_parameters(model)}


def size_text(model: nn.Module) -> str:
    """"parameters 77,632 (non-embedding 51,648)" for ``model``."""
    counts = parameter_counts(model)
    return f"parameters {counts['parameters']:,} (non-embedding {counts['non_embedding_parameters']:,})"


def save_results(out: Path, head: dict[str, str], record: dict[str, Any]) -> dict[str, Any]:
    """Writes ``out``/results.json (the preamble ``head``, then ``record``), prints it without the history, and
    returns it as one dict."""
    write_json(out / "results.json", head, **record)
    summary = {**head, **record}
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2), flush=True)
    return summary
