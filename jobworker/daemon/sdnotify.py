"""Tells systemd (``Type=notify``) when the daemon is ready and when it is stopping, through
the datagram socket named by ``$NOTIFY_SOCKET``; nothing at all when that is unset."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from twisted.application import service
from twisted.logger import Logger


class Notifier:
    """Sends ``KEY=VALUE`` lines to systemd's notification socket (``sd_notify(3)``'s
    protocol: one datagram per message).  ``@name`` is a socket in the abstract
    namespace."""

    log = Logger()

    def __init__(self, address: str | None) -> None:
        self._address: str | None = None
        if address and address[0] == "@":
            self._address = "\0" + address[1:]
        elif address and address[0] == "/":
            self._address = address
        elif address:
            # sd_notify ignores other forms too (vsock: needs a VM; we are a host daemon).
            self.log.warn("systemd.notify_unusable address={address}", address=address)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *lines: str) -> bool:
        """One datagram of ``lines``; never blocks, never raises (systemd gone or slow
        must not stop the daemon).  True if it was sent."""
        if self._address is None:
            return False
        message = "\n".join(lines).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)
                s.sendto(message, self._address)
        except OSError as e:
            self.log.warn("systemd.notify_failed message={message!r} error={error}",
                          message=lines[0], error=e.strerror or str(e))
            return False
        self.log.debug("systemd.notified message={message!r}", message=lines[0])
        return True


class Readiness(service.Service):
    """``READY=1`` once the reactor runs (the port is bound by then and every other service
    started), ``STOPPING=1`` when shutdown begins.  Add it last to the service tree, so it is
    started last and stopped first."""

    def __init__(self, reactor: Any, notifier: Notifier, status: str) -> None:
        self._reactor = reactor
        self._notifier = notifier
        self._status = status

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._ready)

    def _ready(self) -> None:
        if self.running:
            self._notifier.send("READY=1", f"STATUS={self._status}", f"MAINPID={os.getpid()}")

    def stopService(self) -> Any:
        super().stopService()
        self._notifier.send("STOPPING=1", "STATUS=stopping: refusing connections, "
                                          "ending running jobs")
        return None
