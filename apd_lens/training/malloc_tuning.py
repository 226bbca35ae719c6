"""Keep freed memory in the process on glibc (Linux), instead of handing it back to the OS.

An APD step allocates and frees the same large temporaries every step (attributions, component
outputs, gradients: megabytes each). With glibc's defaults, blocks that large are returned to the
OS on free and page-faulted back in on the next allocation, which costs more than the arithmetic
on them: on TMS 40-10 it was about 40% of a step on CPU. :func:`keep_freed_memory` raises glibc's
trim and mmap thresholds once so that freed blocks are reused, and turns off mmap for single large
blocks (``M_MMAP_MAX`` 0): glibc caps the mmap threshold at 32 MiB, and the 2-layer residual MLP's
100 MB per-example gradients were mapped and faulted in afresh every step (step 375 → 300 ms). It is called by
:func:`apd_lens.decompose`; set ``APD_LENS_MALLOC_TUNING=0`` to leave the allocator alone. It does
nothing off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_done: list[bool] = []


def keep_freed_memory() -> bool:
    """Tune glibc's allocator for repeated large temporaries (once per process). Returns whether
    the settings are in effect."""
    if _done:
        return _done[0]
    ok = False
    if sys.platform.startswith("linux") and os.environ.get("APD_LENS_MALLOC_TUNING", "1") != "0":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            ok = all(
                mallopt(option, value) == 1
                for option, value in (
                    (_M_MMAP_THRESHOLD, 32 * 2**20),  # glibc's largest allowed value on 64-bit
                    (_M_TRIM_THRESHOLD, 2**30),
                    (_M_TOP_PAD, 64 * 2**20),
                    (_M_MMAP_MAX, 0),  # larger blocks too come from the (kept) heap
                )
            )
    _done.append(ok)
    return ok
