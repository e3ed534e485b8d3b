"""``--metrics``: a real daemon's Prometheus endpoint, scraped over HTTP while jobs start,
end and fail and connections come and go over the wire."""

from __future__ import annotations

import os
import re
import signal
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PKI, Daemon, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_cgroups import real
from test_robustness import Conn


@pytest.fixture(scope="module")
def metered(test_pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon with --metrics on a free port (learnt from its log)."""
    d = Daemon(test_pki, tmp_path_factory.mktemp("metrics") / "state",
               "--metrics", "tcp:0:interface=127.0.0.1").start()
    d.metrics_url = metrics_url(d)  # type: ignore[attr-defined]
    yield d
    d.stop()


def metrics_url(d: Daemon) -> str:
    m = wait_for(lambda: re.search(r"metrics\.listening host=\S+ port=(\d+)", d.log()),
                 what="the metrics endpoint to listen")
    return f"http://127.0.0.1:{m.group(1)}/metrics"


def scrape(d: Daemon) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of one GET of /metrics: (name, labels) -> value."""
    with urllib.request.urlopen(d.metrics_url, timeout=10) as reply:  # type: ignore[attr-defined]
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: dict[tuple[str, frozenset[tuple[str, str]]], float],
          after: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_jobs_and_requests_move_the_counters_by_what_happened(metered: Daemon) -> None:
    """Two jobs run, one fails to start and one is stopped: started, ended by state,
    running, start latency and per-method request counts move by exactly that."""
    before = scrape(metered)
    c = Conn(metered)
    try:
        c.hello()
        for _ in range(2):
            job = c.call("start", {"command": "/bin/true", "args": []})
            assert c.call("wait", {"job": job["id"]})["state"] == "exited"
        failed = c.call("start", {"command": "/nonexistent/program", "args": []})
        assert failed["state"] == "failed"
        sleeper = c.call("start", {"command": "/bin/sleep", "args": ["30"]})
        during = scrape(metered)
        assert moved(before, during, "jobworker_jobs_running") == 1
        assert value(during, "jobworker_connections_open") >= 1
        assert c.call("stop", {"job": sleeper["id"], "grace": 5})["state"] == "stopped"
        c.send({"id": 99, "method": "no_such_method", "params": {}})
        assert c.read()["error"]["code"] == "unknown_method"
        after = scrape(metered)
    finally:
        c.close()
    assert moved(before, after, "jobworker_jobs_started_total") == 3
    assert moved(before, after, "jobworker_jobs_ended_total", state="exited") == 2
    assert moved(before, after, "jobworker_jobs_ended_total", state="failed") == 1
    assert moved(before, after, "jobworker_jobs_ended_total", state="stopped") == 1
    assert moved(before, after, "jobworker_jobs_running") == 0
    assert moved(before, after, "jobworker_job_start_seconds_count") == 3
    count = "jobworker_rpc_duration_seconds_count"
    assert moved(before, after, count, method="start") == 4
    assert moved(before, after, count, method="wait") == 2
    assert moved(before, after, count, method="stop") == 1
    assert moved(before, after, count, method="other") == 1
    assert moved(before, after, "jobworker_rpc_errors_total", method="other",
                 code="unknown_method") == 1
    # Every sample's name is ours; no *_created timestamps.
    assert all(name.startswith("jobworker_") for name, _ in after)
    assert not any(name.endswith("_created") for name, _ in after)


def test_handshakes_streams_and_closed_connections_are_counted(metered: Daemon,
                                                               test_pki: PKI) -> None:
    """A refused certificate counts a failed handshake; a logs request a stream; a
    client that drops its socket (no TLS close_notify) a connection ended ``lost``, one
    that shuts TLS down first one ended ``closed``."""
    before = scrape(metered)
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
        bad = Conn(metered, identity="expired")
        bad.hello()  # TLS 1.3: the refusal arrives with the first read
    c = Conn(metered)
    c.hello()
    job = c.call("start", {"command": "/bin/echo", "args": ["hi"]})
    c.call("wait", {"job": job["id"]})
    c.send({"id": 50, "method": "logs", "params": {"job": job["id"]}})
    while "result" not in (reply := c.read()):
        assert "error" not in reply, reply
    c.close()
    clean = Conn(metered)
    clean.hello()
    clean.sock.unwrap()  # TLS close_notify, then TCP's close
    clean.close()

    def closed() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        now = scrape(metered)
        counted = [moved(before, now, "jobworker_connections_closed_total", why=why)
                   for why in ("lost", "closed")]
        return now if counted == [1, 1] else None

    after = wait_for(closed, what="the closed connection to be counted")
    assert moved(before, after, "jobworker_tls_handshakes_total", outcome="tls_error") == 1
    assert moved(before, after, "jobworker_tls_handshakes_total", outcome="ok") == 2
    assert moved(before, after, "jobworker_connections_accepted_total") == 3
    assert moved(before, after, "jobworker_log_streams_total", follow="false") == 1
    assert value(after, "jobworker_log_streams_open", follow="false") == 0
    assert value(after, "jobworker_audit_write_failures_total") == 0


def test_only_metrics_is_served(metered: Daemon) -> None:
    """Any other path is a 404, and scrapes write no access lines to the daemon's log."""
    other = metered.metrics_url.replace("/metrics", "/admin")  # type: ignore[attr-defined]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(other, timeout=10)
    assert e.value.code == 404
    scrape(metered)
    assert '"GET /metrics' not in metered.log()


@real
def test_oom_and_time_limit_kills_are_counted(metered: Daemon) -> None:
    """A job over its memory limit counts an OOM kill; one past its timeout a time-out."""
    before = scrape(metered)
    c = Conn(metered)
    try:
        c.hello()
        hog = c.call("start", {"command": sys.executable, "memory": 32 * 1024 * 1024,
                               "args": ["-c", "x = b'\\x01' * (128 * 1024 * 1024)"]})
        slow = c.call("start", {"command": "/bin/sleep", "args": ["30"], "timeout": 0.2})
        assert c.call("wait", {"job": hog["id"]})["oom_killed"] is True
        assert c.call("wait", {"job": slow["id"]})["timed_out"] is True
    finally:
        c.close()
    after = scrape(metered)
    assert moved(before, after, "jobworker_jobs_oom_killed_total") == 1
    assert moved(before, after, "jobworker_jobs_timed_out_total") == 1


def test_jobs_adopted_after_a_crash_count_as_running(test_pki: PKI, tmp_path: Path) -> None:
    """A daemon restarted after SIGKILL adopts its predecessor's job: running 1 though it
    started none; stopping it makes running 0 and counts it ended ``stopped``."""
    state = tmp_path / "state"
    first = Daemon(test_pki, state).start()
    c = Conn(first)
    c.hello()
    job = c.call("start", {"command": "/bin/sleep", "args": ["300"]})
    c.close()
    first.signal(signal.SIGKILL)
    first.proc.wait(10)  # type: ignore[union-attr]
    second = Daemon(test_pki, state, "--metrics", "tcp:0:interface=127.0.0.1").start()
    try:
        second.metrics_url = metrics_url(second)  # type: ignore[attr-defined]
        adopted = scrape(second)
        assert value(adopted, "jobworker_jobs_running") == 1
        assert value(adopted, "jobworker_jobs_started_total") == 0
        c = Conn(second)
        c.hello()
        assert c.call("stop", {"job": job["id"], "grace": 5})["state"] == "stopped"
        c.close()
        after = scrape(second)
        assert value(after, "jobworker_jobs_running") == 0
        assert value(after, "jobworker_jobs_ended_total", state="stopped") == 1
    finally:
        second.stop()
        try:
            os.killpg(job["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_text_daemon_logs_peers_as_host_port_and_each_connection_end(
        metered: Daemon) -> None:
    """The text log (of the metrics test daemon, to spare starting another) writes
    ``peer=127.0.0.1:PORT``, no address repr, and one ``connection.closed`` line when a
    connection is dropped, saying ``why=lost``."""
    c = Conn(metered)
    port = c.sock.getsockname()[1]
    c.hello()
    c.close()
    wanted = re.compile(rf"connection\.closed identity=alice peer=127\.0\.0\.1:{port} "
                        r"duration=[\d.]+s requests=1 why=lost")
    wait_for(lambda: wanted.search(metered.log()), what="the connection.closed line")
    assert f"connection.open identity=alice role=user peer=127.0.0.1:{port}" in metered.log()
    assert "IPv4Address(" not in metered.log()
