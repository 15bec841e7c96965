"""The main thread's plumbing: what wakes it, what it must keep feeding, where I/O goes.

Signal handlers only record (the stop signal) and write a byte to a pipe
(``signal.set_wakeup_fd``); the notice watcher writes to the same pipe. The main loop
sleeps in ``select`` on it, so a signal, a notice or the trainer's exit wakes it at once
and idle it costs next to no CPU. It pings systemd's watchdog, and network I/O that it
must wait for (a final flush, complete.json, a lease) runs in a thread of its own while
the loop keeps pinging: whatever the network does, the watchdog and the drain clock go on.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

from daemon.sdnotify import Notifier, watchdog_interval
from daemon.storage.sync import FlushHandle

IDLE_WAIT_S = 1.0
"""The longest the loop sleeps when nothing wakes it."""


class MainLoop:
    """Wake-ups, the watchdog, and work off the main thread, for one supervisor."""

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.watchdog_every = watchdog_interval()
        self._last_watchdog = 0.0
        self.stop_signal: int | None = None

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGCHLD, self._on_child_signal)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only record: the main loop acts on it (the wakeup fd has already woken it).
        self.stop_signal = signum

    def _on_child_signal(self, _signum: int, _frame: FrameType | None) -> None:
        """SIGCHLD: nothing to record; its byte on the wakeup fd wakes the loop to reap."""

    def wake(self) -> None:
        """Wake the loop (from any thread)."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"n")

    def wait(self, timeout: float) -> None:
        """Sleep until woken (signal, notice, child exit) or ``timeout`` seconds pass."""
        if timeout > 0:
            ready, _, _ = select.select([self._wake_r], [], [], timeout)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)

    def next_watchdog(self) -> float | None:
        """Monotonic time of the next watchdog ping due (None: no watchdog)."""
        return self._last_watchdog + self.watchdog_every if self.watchdog_every else None

    def ping_watchdog(self) -> None:
        now = time.monotonic()
        if self.watchdog_every and now - self._last_watchdog >= self.watchdog_every:
            self._notifier.watchdog()
            self._last_watchdog = now

    def wait_done(self, handle: FlushHandle) -> None:
        """Wait for work running off the loop, feeding the watchdog meanwhile."""
        while not handle.done.wait(min(IDLE_WAIT_S, self.watchdog_every or IDLE_WAIT_S)):
            self.ping_watchdog()

    def off_loop(self, work: Callable[[], object], name: str) -> FlushHandle:
        """Run ``work`` (network I/O) in a thread of its own and wait for it."""

        def run() -> None:
            work()

        handle = FlushHandle(run, name=name)
        self.wait_done(handle)
        return handle

    @contextlib.contextmanager
    def keepalive(self, every: float = 20.0, extend: float = 60.0) -> Iterator[None]:
        """Until READY=1: keep systemd's start timeout ahead of a long restore."""
        done = threading.Event()

        def tick() -> None:
            while not done.wait(every):
                self._notifier.extend_timeout(extend)

        t = threading.Thread(target=tick, name="start-keepalive", daemon=True)
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join()
