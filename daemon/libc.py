"""The C library's functions that Python's ``os`` lacks (``prctl``, ``sync_file_range``,
``malloc_trim``), looked up once each. Standard library only: ``trainer/`` imports it
through :mod:`daemon.layout`.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any


@functools.cache
def libc_function(name: str, *argtypes: Any) -> Any:
    """``name`` from this process's C library, taking ``argtypes`` and returning a C int;
    None where there is none (not Linux, or a libc without it: musl has no
    ``malloc_trim``). Its callers treat each call as a hint that may be missing."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn
