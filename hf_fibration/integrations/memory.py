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
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, int(threshold)))  # the process's own C library
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def trim_heap() -> bool:
    """Give the free pages inside glibc's heap back to the operating system (``malloc_trim(0)``: milliseconds); True
    when something was released (False on other C libraries)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False
