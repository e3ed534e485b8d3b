"""Accepting connections: the listening service, and the cap on connections that refuses
the excess before any TLS work is spent on them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.python.failure import Failure

from jobworker.daemon.address import host_port
from jobworker.daemon.metrics import Metrics
from jobworker.daemon.startup import fail


class Listener(service.Service):
    """Listens on the endpoint and logs where; failing to listen fails startup."""

    log = Logger()

    def __init__(self, endpoint: Any, factory: Any, description: str) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._description = description
        self._port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        outcome: list[Any] = []
        self._endpoint.listen(self._factory).addBoth(outcome.append)
        if not outcome:  # an endpoint that listens asynchronously
            fail(f"cannot listen on {self._description}: endpoint did not listen at once")
        if isinstance(outcome[0], Failure):
            fail(f"cannot listen on {self._description}: {outcome[0].getErrorMessage()}")
        self._port = outcome[0]
        host = self._port.getHost()
        self.log.info("jobworker.listening host={host} port={port}",
                      host=getattr(host, "host", None) or getattr(host, "name", None),
                      port=getattr(host, "port", None))

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
