"""How the process allocates the multi-MiB buffers Kafka records pass through.

Process-wide tuning kept apart from the Kafka adapter, which calls it once when it first
publishes or reads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Final

MALLOC_MMAP_THRESHOLD_BYTES: Final = 32 * 1024 * 1024
MALLOC_TRIM_THRESHOLD_BYTES: Final = 64 * 1024 * 1024
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3


@functools.cache
def tune_allocator() -> bool:
    """Let glibc's malloc reuse the multi-MiB buffers Kafka records pass through.

    Every record is copied several times on its way through aiokafka (batch, request, frame;
    response, fetch buffer, value), each copy into a freshly allocated buffer of a few MiB. With
    glibc's defaults such buffers are mapped and unmapped, or the heap trimmed, at every record,
    and the page faults of touching new pages cost more CPU than the copies themselves: about
    half of what publishing and reading cost. Raising the mmap threshold to its maximum and
    keeping up to 64 MiB free at the heap top lets them be reused. Process-wide, done once, and
    a no-op where the C library has no ``mallopt``. Returns whether it was applied.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES)
    )
