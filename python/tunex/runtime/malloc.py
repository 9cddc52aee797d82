"""glibc malloc settings for CPU training: keep freed heap memory mapped between steps.

A training step frees and reallocates its activations every step; with glibc's defaults the top of
the heap goes back to the kernel and is faulted in, zeroed, again on the next step. ``tune_malloc``
raises the trim and mmap thresholds once per process so the heap stays mapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from tunex import settings

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_tuned = False


def tune_malloc() -> bool:
    """Keep freed heap memory for reuse in this process (glibc only; once per process).

    glibc's defaults return the top of the heap to the kernel whenever 64 MB or more are free there
    and map every block over 32 MB fresh; a training step frees and reallocates its activations
    each step, so each step faulted in its activations' pages again. With a fixed mmap threshold
    of 32 MB and a 1 GB trim threshold the heap stays mapped. The peak is unchanged (it is the same
    heap at its largest). ``TUNEX_MALLOC_TUNE=0`` leaves glibc alone. Returns whether it applied.
    """
    global _tuned
    if _tuned:
        return True
    if not settings.on("TUNEX_MALLOC_TUNE"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _tuned
