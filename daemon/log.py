"""Logging: events with short stable names, values as fields.

``configure()`` is called once at start. Context merges first, the renderer runs last.
Where the events go:

* under systemd, when ``$JOURNAL_STREAM`` says stdout is the journal and journald's
  socket is there: natively to journald, one entry per event, each value its own
  ``SPOT_<KEY>`` field (:mod:`daemon.journal`);
* otherwise (a terminal, a pipe, a test, or any event journald refused): one JSON
  object per line on stdout, or on the ``stream`` given.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Mapping
from typing import Any, TextIO

import structlog

from daemon import journal


class _JournalLogger:
    """structlog's logger when the journal is ours: it gets the event dict, not a string."""

    def __init__(self, sender: journal.JournalSender, fallback: TextIO) -> None:
        self._sender = sender
        self._fallback = fallback
        self._lock = threading.Lock()

    def _emit(self, event_dict: Mapping[str, Any]) -> None:
        if self._sender.send(journal.event_fields(event_dict)):
            return
        # journald did not take it (gone late in a shutdown, or refused): a JSON line on
        # stdout still reaches whatever reads it, journald's stream included.
        line = json.dumps(dict(event_dict), default=str)
        with self._lock:
            try:
                self._fallback.write(line + "\n")
                self._fallback.flush()
            except (OSError, ValueError):
                pass

    def msg(self, event_dict: Mapping[str, Any]) -> None:
        self._emit(event_dict)

    debug = info = warning = warn = error = err = critical = exception = fatal = log = msg


class _JournalLoggerFactory:
    def __init__(self, logger: _JournalLogger) -> None:
        self._logger = logger

    def __call__(self, *args: Any) -> _JournalLogger:
        return self._logger


def _pass_dict(_logger: Any, _name: str, event_dict: Any) -> Any:
    """Last processor in journal mode: hand the whole dict to ``_JournalLogger``."""
    return ((event_dict,), {})


class _JournalHandler(logging.Handler):
    """Third-party stdlib logging (botocore, urllib3) into the journal as fields too."""

    def __init__(self, logger: _JournalLogger) -> None:
        super().__init__()
        self._logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event: dict[str, Any] = {
                "event": record.getMessage(),
                "level": record.levelname.lower(),
                "logger": record.name,
            }
            if record.exc_info:
                event["exception"] = logging.Formatter().formatException(record.exc_info)
            self._logger.msg(event)
        except Exception:  # a log call must never take the daemon down
            self.handleError(record)


def journal_wanted(stream: TextIO | None) -> journal.JournalSender | None:
    """A journald sender when no stream was asked for and stdout is the journal, else None."""
    if stream is not None:
        return None
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    if not journal.stream_is_journal(fd):
        return None
    return journal.JournalSender.connect()


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Send structlog events (and stdlib logging, e.g. botocore warnings) to journald as
    fields when stdout is the journal, else as JSON lines to ``stream`` (default stdout)."""
    out = stream or sys.stdout
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    filtering = structlog.make_filtering_bound_logger(logging.getLevelName(level.upper()))
    root = logging.getLogger()
    sender = journal_wanted(stream)
    if sender is not None:
        jlogger = _JournalLogger(sender, out)
        structlog.configure(
            processors=[*shared, structlog.processors.format_exc_info, _pass_dict],
            wrapper_class=filtering,
            logger_factory=_JournalLoggerFactory(jlogger),
            cache_logger_on_first_use=False,
        )
        root.handlers[:] = [_JournalHandler(jlogger)]
        root.setLevel(logging.WARNING)
        return
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=filtering,
        # WriteLogger: one write() per event line, so lines from the trainer sharing our
        # stdout never land inside one of ours (print() would write the newline apart).
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # Third-party libraries log through stdlib logging; route their warnings to the same stream.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
