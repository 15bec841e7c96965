"""The notice watcher: a thread that polls notice sources and reports each new notice once.

Every ``poll_interval`` seconds it polls each source whose turn it is (a source with
``every=5`` is polled on every fifth round, so a round is usually one HTTP request),
drops notices it has already delivered (by id), and calls ``on_notice`` for the rest.
``on_notice`` should only record or enqueue: it runs on the watcher's thread.

It never dies of a failed poll. Per source it counts consecutive failures, logs
``imds_unavailable`` (at info for the first few, then at debug so a long outage does
not flood the journal), a warning ``imds_degraded`` at 3, 10, 100, 1000, ... in a row,
and ``imds_recovered`` on the first success after failures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import structlog

from daemon.notices import Notice, NoticeSource
from daemon.notices.wire import MetadataUnavailable

log = structlog.get_logger(__name__)

DEFAULT_POLL_INTERVAL = 1.0
INFO_FAILURES = 3
"""Consecutive failures logged at info; later ones go to debug until a threshold."""


def is_degraded_threshold(count: int) -> bool:
    """3, 10, 100, 1000, ...: the failure counts that earn a warning."""
    if count == 3:
        return True
    if count < 10:
        return False
    while count % 10 == 0:
        count //= 10
    return count == 1


@dataclass
class SourceStats:
    """Counters for one source."""

    polls: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    notices: int = 0
    last_error: str | None = None


@dataclass
class WatcherStats:
    """Counters for status and benchmarks. ``requests`` comes from the request counter given."""

    rounds: int = 0
    polls: int = 0
    failures: int = 0
    notices: int = 0
    requests: int = 0
    sources: dict[str, SourceStats] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class _Scheduled:
    source: NoticeSource
    every: int
    stats: SourceStats = field(default_factory=SourceStats)


class NoticeWatcher:
    """Polls ``sources`` on a daemon thread and calls ``on_notice`` once per new notice.

    ``sources`` items are a source (polled every round) or ``(source, every)``.
    ``request_counter``, when given, reports how many HTTP requests the sources have
    made (e.g. ``lambda: client.stats.requests``), for :meth:`stats`.
    """

    def __init__(
        self,
        sources: Sequence[NoticeSource | tuple[NoticeSource, int]],
        on_notice: Callable[[Notice], None],
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        *,
        request_counter: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval {poll_interval} must be positive")
        self._sources: list[_Scheduled] = []
        for item in sources:
            source, every = item if isinstance(item, tuple) else (item, 1)
            if every < 1:
                raise ValueError(f"source {source.name} every={every} must be at least 1")
            self._sources.append(_Scheduled(source, every))
        names = [s.source.name for s in self._sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique: {names}")
        self.on_notice = on_notice
        self.poll_interval = poll_interval
        self._request_counter = request_counter
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._round = 0
        self._polls = 0
        self._failures = 0
        self._notices = 0
        self.last_notice: Notice | None = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> NoticeWatcher:
        """Start polling on a daemon thread (the first round runs at once)."""
        if self._thread is not None:
            raise RuntimeError("watcher already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="notice-watch", daemon=True)
        self._thread.start()
        log.info(
            "notice_watch_started",
            poll_interval=self.poll_interval,
            sources={s.source.name: s.every for s in self._sources},
        )
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop and join. A poll under way finishes first (bounded by the client's timeouts)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("notice_watch_stop_timeout", timeout=timeout)
            else:
                log.info("notice_watch_stopped")

    @property
    def running(self) -> bool:
        """Whether the thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> NoticeWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- polling --------------------------------------------------------------------

    def _run(self) -> None:
        next_at = self._clock()
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # a bug in a source or callback must not end the watch
                log.exception("notice_watch_round_failed")
            next_at += self.poll_interval
            now = self._clock()
            if next_at < now:
                # A slow round (timeouts): start the next one now, do not try to catch up.
                next_at = now
            # Event.wait, not sleep: stop() wakes it at once.
            self._stop.wait(next_at - now)

    def poll_once(self) -> list[Notice]:
        """One round: poll the sources whose turn it is; deliver and return new notices."""
        with self._lock:
            round_no = self._round
            self._round += 1
        delivered: list[Notice] = []
        for sched in self._sources:
            if round_no % sched.every != 0:
                continue
            if self._stop.is_set():
                break  # stopping: no more requests this round
            for notice in self._poll_source(sched):
                if self._deliver(notice, sched):
                    delivered.append(notice)
        return delivered

    def _poll_source(self, sched: _Scheduled) -> list[Notice]:
        name = sched.source.name
        st = sched.stats
        with self._lock:
            st.polls += 1
            self._polls += 1
        try:
            notices = sched.source.poll()
        except MetadataUnavailable as exc:
            with self._lock:
                st.failures += 1
                st.consecutive_failures += 1
                self._failures += 1
                count = st.consecutive_failures
                changed = st.last_error != str(exc)
                st.last_error = str(exc)
            if count <= INFO_FAILURES or changed:
                log.info("imds_unavailable", source=name, error=str(exc), count=count)
            else:
                log.debug("imds_unavailable", source=name, error=str(exc), count=count)
            if is_degraded_threshold(count):
                log.warning("imds_degraded", source=name, count=count, error=str(exc))
            return []
        with self._lock:
            failed_before = st.consecutive_failures
            st.consecutive_failures = 0
            st.last_error = None
        if failed_before:
            log.info("imds_recovered", source=name, after_failures=failed_before)
        return notices

    def _deliver(self, notice: Notice, sched: _Scheduled) -> bool:
        with self._lock:
            if notice.id in self._seen:
                return False
            # Marked seen before the callback runs: a notice is delivered once, even
            # if the callback raises.
            self._seen.add(notice.id)
            self._notices += 1
            sched.stats.notices += 1
            self.last_notice = notice
        log.info("notice_received", source_name=sched.source.name, **notice.to_dict())
        try:
            self.on_notice(notice)
        except Exception:
            log.exception("notice_callback_failed", id=notice.id)
        return True

    # -- status ---------------------------------------------------------------------

    def stats(self) -> WatcherStats:
        """A snapshot of the counters."""
        requests = self._request_counter() if self._request_counter is not None else 0
        with self._lock:
            return WatcherStats(
                rounds=self._round,
                polls=self._polls,
                failures=self._failures,
                notices=self._notices,
                requests=requests,
                sources={s.source.name: SourceStats(**asdict(s.stats)) for s in self._sources},
            )

    def seen(self, notice_id: str) -> bool:
        """Whether a notice with this id has been delivered."""
        with self._lock:
            return notice_id in self._seen


__all__ = [
    "DEFAULT_POLL_INTERVAL",
    "NoticeWatcher",
    "SourceStats",
    "WatcherStats",
    "is_degraded_threshold",
]
