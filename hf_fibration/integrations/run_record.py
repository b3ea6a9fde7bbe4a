"""The record of a CLI run, written beside the checkpoint as ``fibration_report.json`` and read to publish it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT_FILE = "fibration_report.json"
LATER = {"later": True}  # set by a later step (retune, export, push): written only once it holds something


@dataclass
class RunRecord:
    """What a run did and measured. ``config`` is ``FibrationConfig.to_dict()``, ``report`` a
    ``CompressionReport.to_dict()``, ``metrics`` ``{"before": {...}, "after": {...}}`` from ``metrics.quality``.
    Keys this version does not know are kept in ``extra`` and written back."""

    base_model: str | None = None  # the hub id of the model compressed, never a path
    source: str | None = None  # what was compressed: a hub id or a resolved local path
    command: str | None = None
    task: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str | None = None
    seconds: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    rounds: list[dict[str, Any]] | None = None
    metrics_on: str | None = None
    base_card: dict[str, Any] = field(default_factory=dict)  # license, language, datasets of the base's card
    holdout_examples: int | None = None
    retune: dict[str, Any] | None = field(default=None, metadata=LATER)
    exported_from: str | None = field(default=None, metadata=LATER)
    plain: bool = field(default=False, metadata=LATER)
    sentence_transformers: bool = field(default=False, metadata=LATER)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and not (f.metadata.get("later") and value in (None, False)):
                data[f.name] = value
        return {**data, **self.extra}

    @classmethod
    def from_dict(cls, data: Any) -> RunRecord:
        """Any record an hf-fibration version wrote; a missing key takes the field's default."""
        if not isinstance(data, dict):
            raise ValueError(f"A run record is a JSON object, got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names and v is not None}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def load(cls, directory: str | Path) -> RunRecord | None:
        """The record in ``directory``, None when it has none; a file that holds no record raises ValueError."""
        path = Path(directory) / REPORT_FILE
        if not path.exists():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except ValueError as err:
            what = "is not valid JSON" if isinstance(err, json.JSONDecodeError) else "holds no JSON object"
            raise ValueError(f"{path} {what}; restore it or delete it (config.json holds the same record).") from None

    def save(self, directory: str | Path) -> None:
        (Path(directory) / REPORT_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
