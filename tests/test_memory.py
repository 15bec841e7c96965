"""The daemon hands the heap memory it freed back to the OS (daemon.memory)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# What an upload leaves behind in glibc's heap: once a 20 MiB buffer was freed, glibc's
# mmap threshold is 20 MiB, so 16 MiB parts come from the heap; something allocated
# after them stays alive, so free() cannot give their pages back from the heap's top.
_AFTER_A_BURST = textwrap.dedent(
    """
    import os
    from daemon.memory import release_free_memory

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    big = os.urandom(20 << 20)
    del big
    parts = [os.urandom(16 << 20) for _ in range(16)]
    alive = os.urandom(1 << 20)
    del parts
    before = rss()
    released = release_free_memory()
    print(before, rss(), released)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_free_memory_gives_freed_parts_back() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _AFTER_A_BURST],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    before, after, released = int(out[0]), int(out[1]), out[2]
    assert released == "True"
    # 256 MiB of freed parts were resident; most of them are not any more.
    assert before - after > 192 << 20, (before, after)
