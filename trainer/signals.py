"""SIGTERM / SIGUSR1 as flags checked at step boundaries, and the supervisor's notice file.

The handlers only set a flag: saving from inside a handler would run torch.save in the
middle of whatever the step was doing (possibly half-way through an optimizer update),
and could re-enter the allocator or a lock held by the interrupted code. The training
loop looks at the flags once per step, where the state is consistent (CONTRACT §3).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger("trainer.signals")

NOTICE_FILE_ENV = "SPOT_NOTICE_FILE"

_Handler = Any  # what signal.getsignal returns: a callable, an int, a Handlers member or None


class SignalFlags:
    """Records SIGTERM (stop) and SIGUSR1 (save) until the training loop consumes them.

    Plain attribute writes are all a handler does; Python runs the handler in the main
    thread between bytecodes, so no lock is needed (and taking one there could deadlock).
    """

    def __init__(self) -> None:
        self.stop_requested = False
        self.save_requested = False
        self._previous: dict[int, _Handler] = {}

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True

    def _on_usr1(self, signum: int, frame: FrameType | None) -> None:
        self.save_requested = True

    @property
    def installed(self) -> bool:
        """Whether this object's handlers are currently installed."""
        return bool(self._previous)

    def install(self) -> bool:
        """Install the SIGTERM and SIGUSR1 handlers; False (and a warning) off the main thread."""
        if self._previous:
            return True
        if threading.current_thread() is not threading.main_thread():
            # signal.signal only works on the main thread; the caller can still poll
            # the flags if it sets them itself.
            log.warning("not on the main thread: SIGTERM/SIGUSR1 handlers not installed")
            return False
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_term)
        self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_usr1)
        return True

    @property
    def active(self) -> bool:
        """Whether our handlers are the ones installed now (nothing replaced them since)."""
        return (
            self.installed
            and signal.getsignal(signal.SIGTERM) == self._on_term
            and signal.getsignal(signal.SIGUSR1) == self._on_usr1
        )

    def reclaim(self) -> bool:
        """Put our handlers back over whatever replaced them; True when something had.

        For frameworks that install their own SIGTERM handler after ours (Lightning):
        what they installed is dropped, what was there before us is still what
        :meth:`uninstall` restores. Main thread only, as :meth:`install`.
        """
        if not self.installed:
            self.install()
            return False
        if self.active or threading.current_thread() is not threading.main_thread():
            return False
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        return True

    def uninstall(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def take_save_request(self) -> bool:
        """True once per SIGUSR1 burst: reading clears it."""
        requested, self.save_requested = self.save_requested, False
        return requested


@dataclass(frozen=True)
class Notice:
    """What the supervisor wrote to ``$SPOT_NOTICE_FILE`` before sending SIGTERM."""

    action: str
    deadline: dt.datetime
    source: str


def _parse_deadline(raw: Any) -> dt.datetime | None:
    if not isinstance(raw, str):
        return None
    text = raw.strip()
    # Python 3.10's fromisoformat does not accept the trailing "Z" the supervisor writes.
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    # A deadline without an offset is taken as UTC, the only zone the contract uses.
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.timezone.utc)


def read_notice(path: str | os.PathLike[str] | None = None) -> Notice | None:
    """The notice at ``path`` (default ``$SPOT_NOTICE_FILE``); None when absent or unreadable."""
    if path is None:
        env = os.environ.get(NOTICE_FILE_ENV)
        if not env:
            return None
        path = env
    try:
        doc = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        # The supervisor writes the file atomically, so "unreadable" means "no notice".
        return None
    if not isinstance(doc, dict):
        return None
    deadline = _parse_deadline(doc.get("deadline"))
    if deadline is None:
        return None
    return Notice(str(doc.get("action", "")), deadline, str(doc.get("source", "")))


def notice_deadline(path: str | os.PathLike[str] | None = None) -> dt.datetime | None:
    """The notice's deadline as an aware UTC datetime; None when there is no usable notice."""
    notice = read_notice(path)
    return notice.deadline.astimezone(dt.timezone.utc) if notice else None
