"""glibc's allocator keeps freed heap memory for reuse instead of returning it, so a pass that
reads and drops a module's tensors (2-30 MiB each at common widths) one after another grows
the process by what it freed (measured: ~135 MiB per layer at width 1024, bench/memory.py).
A conversion therefore asks for blocks above 1 MiB to be separate mappings, which free()
returns, and trims the heap after each FFN site. No-ops where glibc is not the allocator."""
import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
_LIMIT = 1 << 20


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def return_freed_memory() -> None:
    """Process-wide, from now on: large blocks are mapped apart and the heap trimmed early."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, _LIMIT)
        _LIBC.mallopt(M_TRIM_THRESHOLD, _LIMIT)


def trim() -> None:
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
