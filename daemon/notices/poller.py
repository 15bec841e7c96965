"""A metadata value followed on a daemon thread of its own: started once, stopped at once.

The GCP watches (:class:`~daemon.notices.gcp.HangingWatch`) and the Azure poller
(:class:`~daemon.notices.azure.AzureEventsSource`) talk to their service on their own
thread, so the watcher's rounds (which only read what the thread last saw) never wait
for the network. This is the part they share: the thread's start, a stop that cuts the
request under way (:meth:`MetadataHttp.abort`), and the wait for what the thread
publishes. What the thread asks and what it makes of the answers is theirs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from daemon.notices.metadata_http import MetadataHttp


class MetadataThread:
    """``_run`` on a daemon thread named ``thread_name``, over one :class:`MetadataHttp`.

    ``_lock`` guards what the thread publishes; ``_changed`` (on that lock) is notified
    when it publishes something new; ``_stop`` is set when the thread must end.
    """

    def __init__(self, http: MetadataHttp, thread_name: str) -> None:
        self._http = http
        self._thread_name = thread_name
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        raise NotImplementedError

    def _start_thread(self) -> None:
        """Start the thread, the first time only."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=self._thread_name, daemon=True
                )
                self._thread.start()

    def _stop_thread(self, timeout: float) -> None:
        """Stop: the request under way is cut off at once (its socket shut down)."""
        self._stop.set()
        self._http.abort()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._http.close()

    @property
    def requests(self) -> int:
        """Requests sent so far."""
        return self._http.requests

    def _wait_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Block until ``done()`` (checked under the lock at each change), at most
        ``timeout`` seconds: whether it came true."""
        end = time.monotonic() + timeout
        with self._changed:
            while not done():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True


__all__ = ["MetadataThread"]
