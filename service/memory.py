"""The server's heap: how many glibc malloc arenas it may use, and handing freed pages back.

glibc gives each thread that allocates under contention an arena of its own, up to 8 per core.
The server starts threads all its life (an inference thread per loaded version, ORT's pools, the
pipeline's workers), and each new arena keeps some of what passed through it: under load the
resident memory climbed with each live version swap and settled only once the arenas ran out
(bench/soak.py: about 410 -> 500 MiB over 8 swaps with glibc's default, flat about 300-400 MiB with
2 arenas, and no less throughput in interleaved runs). Other allocators (musl, jemalloc) are left alone.
"""
from __future__ import annotations

import ctypes
import gc
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas at ``arenas`` (0: glibc's default); call before threads start.
    Returns whether the cap was set."""
    libc = _libc()
    if arenas <= 0 or libc is None:
        return False
    ok = bool(libc.mallopt(M_ARENA_MAX, int(arenas)))
    log.debug("malloc arenas capped at %d: %s", arenas, ok)
    return ok


def release_memory() -> None:
    """Collect an unloaded version's reference cycles now and hand freed heap pages back to the
    system (glibc keeps them otherwise: RSS would ratchet up by a model's size on some swaps)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
