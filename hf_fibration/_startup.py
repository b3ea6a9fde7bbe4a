"""Ctrl-C while the command line is still importing torch and transformers: one line, no traceback.

Imported first by the package; it changes nothing unless the process is the ``hf-fibration`` command (or
``python -m hf_fibration.cli``). ``cli.main`` handles interrupts itself once it runs; this covers the seconds before.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _is_cli() -> bool:
    argv = getattr(sys, "orig_argv", sys.argv)
    command = Path(sys.argv[0]).name if sys.argv else ""
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
    return command in ("hf-fibration", "hf-fibration.exe") or module == "hf_fibration.cli"


_interrupted = []


def _on_interrupt(signum: int, frame) -> None:
    _interrupted.append(signum)
    raise KeyboardInterrupt


def _quiet_interrupt(kind: type[BaseException], value: BaseException, tb) -> None:
    if issubclass(kind, KeyboardInterrupt) or _interrupted:
        # an interrupt inside numpy's or scipy's own import can surface as another error (a half-imported module)
        print("hf-fibration: interrupted while starting; no output written.", file=sys.stderr)
        if not issubclass(kind, KeyboardInterrupt):  # exit as an interrupted process does
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
    else:
        _previous(kind, value, tb)


_previous = sys.excepthook
if _is_cli():
    sys.excepthook = _quiet_interrupt
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_interrupt)
