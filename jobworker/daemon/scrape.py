"""The ``--metrics`` endpoint: plain HTTP serving the daemon's registry at ``/metrics``
through ``prometheus_client``'s Twisted resource (the text exposition format)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application import service
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from jobworker.daemon.startup import fail


def metrics_site(registry: CollectorRegistry) -> Site:
    """A site with the registry at ``/metrics`` and nothing else (404 elsewhere)."""
    # Imported here: the module installs nothing, but it names the global reactor,
    # which must be the one twistd chose by now.
    from prometheus_client.twisted import MetricsResource

    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))
    site = _QuietSite(root)
    site.noisy = False
    site.displayTracebacks = False
    return site


class _QuietSite(Site):
    """A site that writes no access line per request: a scrape every few seconds would
    bury the daemon's own log."""

    def log(self, request: Any) -> None:
        pass


class ScrapeEndpoint(service.Service):
    """Listens on ``--metrics``; failing to listen fails start-up, as ``--listen`` does."""

    log = Logger()

    def __init__(self, endpoint: Any, site: Site, description: str) -> None:
        self._endpoint = endpoint
        self._site = site
        self._description = description
        self._port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.listen()

    def listen(self) -> None:
        """Bind and listen now (``makeService`` calls it before twistd daemonizes), or
        fail start-up naming ``--metrics`` and the reason."""
        if self._port is not None:
            return
        outcome: list[Any] = []
        self._endpoint.listen(self._site).addBoth(outcome.append)
        if not outcome or isinstance(outcome[0], Failure):
            why = outcome[0].getErrorMessage() if outcome else "did not listen at once"
            fail(f"cannot listen for --metrics on {self._description}: {why}")
        self._port = outcome[0]
        host = self._port.getHost()
        self.log.info("metrics.listening host={host} port={port}",
                      host=getattr(host, "host", None), port=getattr(host, "port", None))

    def stopService(self) -> Any:
        super().stopService()
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()
        return None
