"""What every results file starts with (command, machine, date) and the writers of the JSON files under results/."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def load_average() -> str:
    """The 1-minute load average, so a timing taken on a busy shared machine says so."""
    return f"load average {os.getloadavg()[0]:.1f}"


def machine(device: str | None = None, load: bool = False) -> str:
    """CPU or GPU, core count, torch version and threads: enough to compare timings honestly.

    The GPU is named when CUDA is available and ``device`` (default: any) is a CUDA device; ``load`` appends the
    load average.
    """
    gpu = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    name = torch.cuda.get_device_name(0) if gpu else f"{platform.machine()} CPU"
    text = f"{name}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    return f"{text}, {load_average()}" if load else text


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """``python scripts/<script> ARGS`` with the arguments main() got (default: this process's)."""
    return f"python scripts/{Path(script).name} {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip()


def preamble(command: str | None = None, device: str | None = None, load: bool = False) -> dict[str, str]:
    """{"command", "machine", "date"} of this run (the command defaults to this process's argv)."""
    return {"command": command or "python " + " ".join(sys.argv), "machine": machine(device, load),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def preamble_markdown(head: dict[str, str]) -> str:
    return f"- command: `{head['command']}`\n- machine: {head['machine']}\n- date: {head['date']}\n"


def print_preamble(command: str | None = None, device: str | None = None, load: bool = False) -> dict[str, str]:
    """The preamble of this run, printed before anything else it prints."""
    head = preamble(command, device, load)
    print(preamble_markdown(head), flush=True)
    return head


def write_json(path: str | Path, head: dict[str, str] | None = None, **fields: Any) -> Path:
    """A results JSON file: the preamble (default: this run's), then the fields."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**(preamble() if head is None else head), **fields}, indent=2) + "\n")
    return path


def write_rows(directory: str | Path, rows: list[dict[str, Any]], head: dict[str, str] | None = None,
               **extra: Any) -> Path:
    """results/<name>/rows.json: the preamble, the rows and anything else the table needs."""
    return write_json(Path(directory) / "rows.json", head, **extra, rows=rows)


def keep_row(rows: list[dict[str, Any]], row: dict[str, Any], head: dict[str, str], path: str | Path
             ) -> dict[str, Any]:
    """Append ``row`` stamped with this run's machine and date to ``rows``, print it and write every row to ``path``
    at once (a resumable benchmark cut short keeps what it measured); returns the stamped row."""
    rows.append({**row, "machine": head["machine"], "date": head["date"]})
    print(json.dumps(rows[-1], default=str), flush=True)
    write_json(path, head, rows=rows)
    return rows[-1]


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows a resumable benchmark wrote to ``path`` (``write_json(path, head, rows=...)``), or none yet."""
    path = Path(path)
    return json.loads(path.read_text())["rows"] if path.exists() else []
