"""Keep freed large blocks in the process heap.

Each poll allocates arrays of the same large sizes (drained keys, merged
records, encoded messages). glibc maps blocks over 32 MB with mmap and unmaps
them on free, so every poll paid page faults (and huge-page compaction) again:
at a million flows that was a third of the time from drain to wire
(bench/run.py). Raising the thresholds keeps them mapped for reuse; resident
memory then stays at the high-water mark of one poll.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LIMIT = 1 << 30  # a gigabyte: well above one poll's arrays, below glibc's 32-bit cap


def keep_heap() -> bool:
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, LIMIT)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, LIMIT)
        )
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
