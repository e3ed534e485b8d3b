"""Accepting connections: the listening service, and the cap on connections that refuses
the excess before any TLS work is spent on them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.python.failure import Failure

from jobworker import __version__
from jobworker.daemon.address import host_port
from jobworker.daemon.metrics import Metrics
from jobworker.daemon.startup import fail


class Listener(service.Service):
    """Listens on the endpoint and logs where.  ``listen`` is called from ``makeService``,
    so a port that cannot be had stops start-up with one line before twistd daemonizes.
    The RPC port (``--listen``) and the metrics port (``--metrics``) are both one."""

    log = Logger()

    def __init__(self, endpoint: Any, factory: Any, description: str,
                 option: str = "--listen", event: str = "jobworker.listening") -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._description = description
        self._option = option
        self._event = event
        self._port: Any = None

    def listen(self) -> None:
        """Bind and listen now, or fail start-up naming ``--listen`` and the reason."""
        if self._port is not None:
            return
        outcome: list[Any] = []
        self._endpoint.listen(self._factory).addBoth(outcome.append)
        where = f"{self._option} {self._description}"
        if not outcome:  # an endpoint that listens asynchronously
            fail(f"{where}: the endpoint did not listen at once")
        if isinstance(outcome[0], Failure):
            error = outcome[0].value
            reason = getattr(getattr(error, "socketError", None), "strerror", None)
            if isinstance(error, CannotListenError) and reason:
                fail(f"{where}: cannot listen on {error.interface or '*'}:{error.port}: "
                     f"{reason}")
            fail(f"{where}: cannot listen: {outcome[0].getErrorMessage()}")
        self._port = outcome[0]
        host = self._port.getHost()
        if not isinstance(host, IPv4Address | IPv6Address) or host.type != "TCP":
            # jwclient's --server is HOST:PORT over TCP (and a scrape is HTTP over TCP):
            # nothing else could reach us.
            self._port.stopListening()
            fail(f"{where}: not a TCP port, which is all a client can reach")

    @property
    def address(self) -> str:
        """``host:port`` (``[host]:port`` for IPv6) of the bound port, as jwclient's
        ``--server`` takes it."""
        host = self._port.getHost()
        return f"[{host.host}]:{host.port}" if ":" in host.host else f"{host.host}:{host.port}"

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.listen()
        host = self._port.getHost()
        self.log.info("{event} host={host} port={port} version={version}",
                      event=self._event, host=host.host, port=host.port, version=__version__)

    def stopService(self) -> Any:
        super().stopService()
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()
        return None


class ConnectionCap(policies.WrappingFactory):
    """Refuses a connection before any TLS work is spent on it while ``full`` gives a
    reason (a pool of connections is full)."""

    log = Logger()
    noisy = False

    def __init__(self, wrapped: Any, full: Callable[[], str | None],
                 metrics: Metrics | None = None) -> None:
        super().__init__(wrapped)
        self.full = full
        self.metrics = metrics if metrics is not None else Metrics()

    def buildProtocol(self, addr: Any) -> Any:
        reason = self.full()
        if reason is not None:
            self.log.warn("connection.refused reason=cap {why} peer={addr}",
                          why=reason, addr=host_port(addr))
            self.metrics.connection_refused(
                "handshake_cap" if reason.startswith("handshakes") else "connection_cap")
            return None
        self.metrics.connection_accepted()
        return super().buildProtocol(addr)
