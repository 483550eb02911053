"""glibc's allocator, where it matters for our measurements and run times (a no-op elsewhere).

``reuse_freed_memory`` speeds up the float64 parity fixtures; ``release_freed_memory`` hands freed
heap pages back to the kernel so a reused Ray worker's resident memory (and the peak a trial
reports) does not carry a previous trial's freed memory.
"""
from __future__ import annotations

import contextlib
import ctypes
from typing import Iterator, Optional


def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def release_freed_memory() -> None:
    """``malloc_trim(0)``: freed pages anywhere in the heap go back to the kernel, not only its top."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Inside, glibc keeps freed memory for reuse instead of handing every large block back to the
    kernel: the fixtures run full-width networks in float64, and each 100+ MB temporary would
    otherwise be a fresh mmap whose pages the kernel zero-fills (a third of the run as system time,
    measured). Afterwards the defaults come back and the freed memory is returned (malloc_trim).
    A no-op where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        yield
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = all(libc.mallopt(opt, value) == 1 for opt, value in
             ((m_mmap_threshold, 2 ** 31 - 1), (m_trim_threshold, 2 ** 31 - 1), (m_top_pad, 1 << 28)))
    try:
        yield
    finally:
        if ok:
            for opt, value in ((m_mmap_threshold, 128 * 1024), (m_trim_threshold, 128 * 1024), (m_top_pad, 0)):
                libc.mallopt(opt, value)
        release_freed_memory()
