"""The ``--metrics`` site, which a ``Listener`` serves: plain HTTP with the daemon's
registry at ``/metrics`` through ``prometheus_client``'s Twisted resource (the text
exposition format)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from twisted.web.resource import Resource
from twisted.web.server import Site


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
