"""The host allocator: freed memory is kept for the next step instead of going back to the OS.

Why: a training step allocates and frees activations of hundreds of MB (the first Conv4 layer of
32 tasks of 5-way 1-shot with 16 queries: 256 MB in bf16, per tensor). glibc serves blocks that
large with ``mmap`` and returns them with ``munmap``, so every step touches fresh pages that the
kernel must zero and map: on the project's 2-core machine those page faults took more time than
the arithmetic (a bf16 HyperMAML step of 32 tasks: 1.8 s, 1.1 s with the memory kept; see
docs/benchmarks.md). PyTorch's CPU tensors come from plain ``malloc``, so two ``mallopt`` calls
fix it in-process: no ``mmap`` for large blocks, no trimming of the heap. The process then keeps
its peak memory until it ends, which a training or evaluation process reaches anyway.
"""

from __future__ import annotations

import ctypes
import sys

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_state: str | None = None


def keep_freed_memory() -> str:
    """Keep freed memory in the process (glibc); idempotent. Returns what was done, for the
    run header: where the C library is not glibc (macOS, musl) nothing changes, and it says so."""
    global _state
    if _state is not None:
        return _state
    libc = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version.restype = ctypes.c_char_p
            version = libc.gnu_get_libc_version().decode()
        except (OSError, AttributeError):
            libc = None
    if libc is None:
        _state = "host memory: the C library's default (not glibc)"
        return _state
    done = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    _state = (f"host memory: freed blocks kept for reuse (glibc {version})" if done else
              f"host memory: glibc {version} refused mallopt; the default allocator")
    return _state


__all__ = ["keep_freed_memory"]
