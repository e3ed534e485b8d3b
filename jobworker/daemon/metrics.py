"""What the daemon counts, as calls on one object: the seam between the code that sees
events (connections, requests, streams, jobs) and a metrics library.

``Metrics`` itself counts nothing, so a daemon without ``--metrics`` pays a no-op call
per event and never imports ``prometheus_client``; ``jobworker.daemon.prometheus`` is the
real one.  Every method is called on the reactor thread and must stay cheap: it is on
the path of every request.
"""

from __future__ import annotations

from jobworker.jobs.job import Job


class Metrics:
    """Counts nothing (the daemon's default); also the manager's ``JobObserver``."""

    def request_done(self, method: str, seconds: float, error: str | None) -> None:
        """A request for ``method`` was answered after ``seconds``; ``error``: its error
        code, ``cancelled`` if its connection went first, None if it succeeded."""

    def connection_accepted(self) -> None:
        """A TCP connection was accepted (its TLS handshake comes next)."""

    def connection_refused(self, reason: str) -> None:
        """A connection was refused: ``handshake_cap`` (before TLS) or
        ``connection_cap`` (after its handshake, all authenticated slots taken)."""

    def handshake_done(self, outcome: str) -> None:
        """A TLS handshake ended: ``ok``, ``timeout``, ``tls_error`` (a certificate
        refused, a protocol mismatch) or ``closed`` (the peer went first)."""

    def connection_closed(self, why: str) -> None:
        """An authenticated connection ended, for ``why`` (see ``connection.closed``)."""

    def stream_opened(self, follow: bool) -> None:
        """A ``logs`` stream began (``follow``: it tails a running job)."""

    def stream_closed(self, follow: bool) -> None:
        """A ``logs`` stream ended."""

    def job_started(self, job: Job) -> None:
        """``job``'s process was spawned."""

    def job_adopted(self, job: Job) -> None:
        """``job`` was adopted from an earlier daemon."""

    def job_ended(self, job: Job) -> None:
        """``job`` ended."""
