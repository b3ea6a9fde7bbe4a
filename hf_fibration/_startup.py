"""Ctrl-C while the command line is still importing torch and transformers: one line, no traceback.

Imported first by the package; it changes nothing unless the process is the ``hf-fibration`` command (or
``python -m hf_fibration.cli``). ``cli.main`` handles interrupts itself once it runs; this covers the seconds before.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _is_cli() -> bool:
    argv = getattr(sys, "orig_argv", sys.argv)
    command = Path(sys.argv[0]).name if sys.argv else ""
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
    return command in ("hf-fibration", "hf-fibration.exe") or module == "hf_fibration.cli"


def _quiet_interrupt(kind: type[BaseException], value: BaseException, tb) -> None:
    if issubclass(kind, KeyboardInterrupt):
        print("hf-fibration: interrupted while starting; no output written.", file=sys.stderr)
    else:
        _previous(kind, value, tb)


_previous = sys.excepthook
if _is_cli():
    sys.excepthook = _quiet_interrupt
