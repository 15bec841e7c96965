"""Handing the heap memory the daemon freed back to the OS (glibc's ``malloc_trim``).

The daemon holds large buffers only in bursts: an emergency upload's parts (16 MiB each,
up to ``s3.max_concurrency`` of them), a restore's ranges, botocore's models parsed at
start-up. glibc keeps what Python frees for reuse, and once a large buffer has been
freed it raises its mmap threshold to that size, so later buffers of that size come
from the heap and stay resident after they are freed. A supervisor idles for hours
between checkpoints, on an instance whose data loaders want that memory, so after each
burst it hands what is free back. ``malloc_trim(0)`` walks the free lists (milliseconds)
and releases whole free pages; it never touches live objects.
"""

from __future__ import annotations

import ctypes

from daemon.libc import libc_function


def release_free_memory() -> bool:
    """Give the heap's free pages back to the OS; whether any were (False: none, or no
    glibc). Call it after a burst of large buffers, never in a hot path."""
    fn = libc_function("malloc_trim", ctypes.c_size_t)
    return fn is not None and bool(fn(0))
