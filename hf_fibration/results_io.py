"""What every results file starts with (command, machine, date) and the writers of results/<name>/rows.json."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch


def machine() -> str:
    """CPU or GPU, core count, torch version and threads: enough to compare timings honestly."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{platform.machine()} CPU"
    return f"{device}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def preamble(command: str | None = None) -> dict[str, str]:
    """{"command", "machine", "date"} of this run (the command defaults to this process's argv)."""
    return {"command": command or "python " + " ".join(sys.argv), "machine": machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def preamble_markdown(head: dict[str, str]) -> str:
    return f"- command: `{head['command']}`\n- machine: {head['machine']}\n- date: {head['date']}\n"


def write_rows(directory: str | Path, rows: list[dict[str, Any]], head: dict[str, str] | None = None,
               **extra: Any) -> Path:
    """results/<name>/rows.json: the preamble, the rows and anything else the table needs."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "rows.json"
    path.write_text(json.dumps({**(head or preamble()), **extra, "rows": rows}, indent=2) + "\n")
    return path
