"""The library's one exception type, in a module of its own so every part can raise it."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, or does not fit the objects it is restored into."""


# Shown (and documented) where users import it from.
CheckpointError.__module__ = "trainer.checkpoint"


def first_line(exc: BaseException) -> str:
    """``TypeName: first line of the message``, for one-line reports across ranks."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
