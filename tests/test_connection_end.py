"""Why a connection ended, on Twisted's fakes: the ``connection.closed`` line and the
metrics that count handshakes, closes and request latency, with time advanced on a fake
clock, never waited for."""

from __future__ import annotations

from typing import Any

import pytest
from OpenSSL import SSL, crypto
from test_protocol import Server, frame
from twisted.internet import error
from twisted.python.failure import Failure

from jobworker import pki
from jobworker.daemon.limits import Limits
from jobworker.daemon.prometheus import PrometheusMetrics
from jobworker.wire.params import SCHEMAS


@pytest.fixture(scope="module")
def alice_cert() -> crypto.X509:
    ca_key, ca_cert = pki.make_ca()
    _, cert = pki.make_client_cert(ca_key, ca_cert, "alice", role="user")
    return crypto.X509.from_cryptography(cert)


def metered(s: Server) -> PrometheusMetrics:
    """Count ``s``'s events (the connection reads its server's metrics at each event)."""
    metrics = PrometheusMetrics(SCHEMAS, s.reactor.seconds)
    s.factory.metrics = metrics
    return metrics


def sample(metrics: PrometheusMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def closed_lines(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if str(e.get("log_format", "")).startswith("connection.closed")]


def end(s: Server, reason: Exception) -> None:
    s.proto.connectionLost(Failure(reason))


def test_an_idle_connection_ends_idle_timeout_with_its_duration_and_requests(
        alice_cert: Any, events: list[dict[str, Any]]) -> None:
    """After hello and whoami, the idle timeout ends it: one connection.closed line with
    identity, the fake clock's duration, 2 requests and why=idle_timeout; counted."""
    s = Server(alice_cert, Limits(idle_timeout=30))
    metrics = metered(s)
    s.hello()
    s.send(frame({"id": 1, "method": "whoami", "params": {}}))
    s.reactor.advance(30)
    assert s.closed
    end(s, error.ConnectionLost())
    (line,) = closed_lines(events)
    assert (line["identity"], line["requests"], line["why"], line["duration"]) == \
        ("alice", 2, "idle_timeout", 30.0)
    assert sample(metrics, "jobworker_connections_closed_total", why="idle_timeout") == 1
    assert sample(metrics, "jobworker_rpc_duration_seconds_count", method="whoami") == 1


@pytest.mark.parametrize("reason, why", [
    (error.ConnectionDone(), "closed"),
    (error.ConnectionLost(), "lost"),
    (SSL.Error([("SSL routines", "", "bad record mac")]), "tls_error"),
    (OSError("odd"), "error"),
])
def test_a_connection_lost_says_how(alice_cert: Any, events: list[dict[str, Any]],
                                    reason: Exception, why: str) -> None:
    """A connection the daemon did not end is closed, lost, a TLS error or an error."""
    s = Server(alice_cert)
    metrics = metered(s)
    s.hello()
    end(s, reason)
    assert [line["why"] for line in closed_lines(events)] == [why]
    assert sample(metrics, "jobworker_connections_closed_total", why=why) == 1


def test_what_the_daemon_ends_it_for_wins_over_how_it_was_lost(
        alice_cert: Any, events: list[dict[str, Any]]) -> None:
    """A request before hello closes it ``protocol_error``; an oversized frame
    ``frame_too_large``; a revoked identity ``revoked``."""
    whys = []
    for act in (lambda s: s.send(frame({"id": 1, "method": "whoami", "params": {}})),
                lambda s: s.send(b"\xff\xff\xff\xff"),
                lambda s: (s.hello(), s.proto.revoke("gone"))):
        s = Server(alice_cert)
        act(s)
        end(s, error.ConnectionDone())
        whys.append(closed_lines(events)[-1]["why"])
    assert whys == ["protocol_error", "frame_too_large", "revoked"]


def test_handshakes_are_counted_by_outcome(alice_cert: Any,
                                           events: list[dict[str, Any]]) -> None:
    """A handshake that never finishes times out; one the peer leaves is ``closed``; a
    refused certificate ``tls_error``; none logs connection.closed (they never
    authenticated)."""
    outcomes = []
    for finish in (lambda s: (s.reactor.advance(Limits().handshake_timeout),
                              end(s, error.ConnectionLost())),
                   lambda s: end(s, error.ConnectionDone()),
                   lambda s: end(s, SSL.Error([("SSL routines", "", "certificate "
                                                "verify failed")]))):
        s = Server(alice_cert, handshake=False)
        metrics = metered(s)
        finish(s)
        outcomes.append(next(o for o in ("timeout", "closed", "tls_error", "ok")
                             if sample(metrics, "jobworker_tls_handshakes_total",
                                       outcome=o)))
    assert outcomes == ["timeout", "closed", "tls_error"]
    assert closed_lines(events) == []
