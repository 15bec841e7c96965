"""sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET``.

A no-op when the supervisor does not run under a ``Type=notify`` unit.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends ``READY=1``, ``STATUS=...``, ``WATCHDOG=1`` and friends to systemd."""

    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading '@' in the environment.
        self._address = "\0" + addr[1:] if addr.startswith("@") else addr

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines; True when systemd got them (or nobody listens)."""
        if not self._address:
            return True
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self._address)
                s.sendall(msg)
        except OSError:
            # systemd gone (e.g. during shutdown): notifications are best effort.
            return False
        return True

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status)

    def status(self, status: str) -> None:
        self.send(status=status)

    def watchdog(self) -> None:
        self.send(watchdog=1)

    def extend_timeout(self, seconds: float) -> None:
        self.send(extend_timeout_usec=int(seconds * 1_000_000))

    def stopping(self, status: str) -> None:
        self.send(stopping=1, status=status)


def watchdog_interval() -> float | None:
    """Half the unit's ``WatchdogSec`` when systemd armed a watchdog for us, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
