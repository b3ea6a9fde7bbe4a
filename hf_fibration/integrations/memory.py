"""Peak memory: hand big freed buffers back to the operating system.

glibc serves allocations below its mmap threshold from the heap, and raises that threshold (up to 32 MB) each time a
big mapped buffer is freed. After that, the tokens × units matrices of a calibration refit, the distance matrices of
a dendrogram and the activations of an eval batch stay in the heap when freed, and the resident size of a long
compression grows with its fragments. A fixed threshold maps every buffer above it on its own and unmaps it on free:
the same values, at the same speed within noise (results/peak_rss). ``hf-fibration`` sets it at start; Python users
call :func:`return_big_frees` (or set ``MALLOC_MMAP_THRESHOLD_`` in the environment). Buffers below the threshold
(a batch's activations, a site's row captures) still leave free pages inside the heap; :func:`trim_heap`, called
between sites, hands those back too.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
DEFAULT_THRESHOLD = 4 << 20


def return_big_frees(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; True when it took effect (False on other C libraries, or
    when ``MALLOC_MMAP_THRESHOLD_`` already chose one)."""
    return "MALLOC_MMAP_THRESHOLD_" not in os.environ and _glibc("mallopt", M_MMAP_THRESHOLD, int(threshold))


def trim_heap() -> bool:
    """Give the free pages inside glibc's heap back to the operating system (``malloc_trim(0)``: milliseconds); True
    when something was released (False on other C libraries)."""
    return _glibc("malloc_trim", 0)


def _glibc(function: str, *args: int) -> bool:
    """``function(*args)`` of the process's own C library, as a bool; False off Linux or where the library lacks it
    (musl has neither mallopt nor malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(getattr(ctypes.CDLL(None), function)(*args))
    except (OSError, AttributeError):
        return False
