"""systemd integration without libsystemd: sd_notify(3) (credentials: `credentials`).

``Notifier`` speaks the notify protocol: one datagram of newline-separated
``KEY=VALUE`` assignments sent to the AF_UNIX socket named by ``NOTIFY_SOCKET``
(a filesystem path, or ``@name`` for the abstract namespace). Without
``NOTIFY_SOCKET`` (not started by systemd, or not ``Type=notify``) every method is a
no-op returning False, so callers never need to ask first. Sending never raises and
never blocks: the socket is non-blocking, and a failure is logged once and reported
as False - a missed status update must not take the daemon down.

``NOTIFY_SOCKET`` is deliberately left in the environment: the shipped unit sets
``NotifyAccess=main``, so messages from children that inherit it (the embedded
PostgreSQL) are ignored by systemd, and the daemon may re-create a ``Notifier``.

The daemon's side of the unit (``systemd/userstreamd.service``)::

    notifier = Notifier.from_environ()
    notifier.ready(status="streaming")            # after every component has started
    notifier.watchdog()                           # every notifier.watchdog_interval_s
    notifier.reloading(); ...; notifier.ready()   # around a SIGHUP reload
    notifier.stopping()                           # when SIGTERM/SIGINT arrives
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from ..logs import get_logger

__all__ = ["Notifier"]


def _socket_address(value: str) -> bytes | None:
    """NOTIFY_SOCKET as a sendto() address; None when it is not one we can use."""
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    return None  # relative paths are invalid; vsock: addresses need systemd >= 253 and AF_VSOCK


def _watchdog_interval_s(environ: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC (the sd_watchdog_enabled(3) advice), if meant for this process."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None  # set for our parent (or a process we were forked from)
        except ValueError:
            return None
    return usec / 1_000_000 / 2


def _one_line(text: str) -> str:
    """A value may not contain a newline: it would start a new assignment."""
    return " ".join(text.splitlines())


class Notifier:
    """sd_notify(3) client. Disabled (every method a no-op) when NOTIFY_SOCKET is unset.

    ``watchdog_interval_s`` is how often to call ``watchdog()``: half of WATCHDOG_USEC,
    or None when systemd set no watchdog, when it is meant for another process
    (WATCHDOG_PID), or when the notifier is disabled (nobody to ping).
    """

    def __init__(self, address: bytes | None, watchdog_interval_s: float | None = None) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        self._closed = False
        self._warned = False
        self.watchdog_interval_s = watchdog_interval_s if address is not None else None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID (without unsetting any)."""
        raw = environ.get("NOTIFY_SOCKET", "")
        address = _socket_address(raw) if raw else None
        if raw and address is None:
            get_logger().warning("systemd.notify_socket_invalid", notify_socket=raw)
        return cls(address, _watchdog_interval_s(environ))

    @property
    def enabled(self) -> bool:
        return self._address is not None and not self._closed

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True if the kernel took it."""
        address = self._address
        if address is None or self._closed or not assignments:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto("\n".join(assignments).encode(), address)
        except OSError as exc:  # ENOENT, ECONNREFUSED, EAGAIN (queue full), ...
            if not self._warned:
                self._warned = True
                get_logger().warning(
                    "systemd.notify_failed",
                    notify_socket=os.fsdecode(address).replace("\0", "@", 1),
                    error=str(exc),
                    note="further failures are not logged",
                )
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) finished: READY=1, the status line, our PID."""
        parts = ["READY=1"]
        if status is not None:
            parts.append(f"STATUS={_one_line(status)}")
        parts.append(f"MAINPID={os.getpid()}")
        return self.send(*parts)

    def status(self, text: str) -> bool:
        """The one-line status `systemctl status` shows."""
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Keep-alive; send at least every ``watchdog_interval_s``."""
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun."""
        parts = ["STOPPING=1"]
        if status is not None:
            parts.append(f"STATUS={_one_line(status)}")
        return self.send(*parts)

    def reloading(self) -> bool:
        """A reload has begun; send ``ready()`` when it is done.

        MONOTONIC_USEC is what systemd >= 253 requires with Type=notify-reload (it
        matches the message to the reload request); older versions ignore it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def close(self) -> None:
        """Close the socket; the notifier is disabled from now on."""
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None
