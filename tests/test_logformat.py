"""``--log-format json`` and the connection lines: the daemon's log as JSON objects, one
per line, and ``connection.closed`` with identity, duration, requests and why."""

from __future__ import annotations

import io
import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PKI, Daemon, wait_for
from test_robustness import Conn
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python import log as legacy_log

from jobworker.daemon.address import host_port
from jobworker.daemon.logformat import event_as_json, json_observer, twistd_destination


def lines_of(emit: Any) -> list[dict[str, Any]]:
    """What ``emit(logger)`` logs, through the JSON observer, parsed back line by line."""
    out = io.StringIO()
    observer = json_observer(out)
    globalLogPublisher.addObserver(observer)
    try:
        emit(Logger(namespace="test.ns"))
    finally:
        globalLogPublisher.removeObserver(observer)
    text = out.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_a_line_has_time_level_event_name_and_the_fields() -> None:
    """The formatted message, the stable name from the format and every field."""
    (line,) = lines_of(lambda log: log.warn("connection.refused reason=cap peer={addr}",
                                            addr="127.0.0.1:5", count=3))
    assert line["event"] == "connection.refused reason=cap peer=127.0.0.1:5"
    assert line["name"] == "connection.refused"
    assert line["level"] == "warn"
    assert line["namespace"] == "test.ns"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    assert line["addr"] == "127.0.0.1:5" and line["count"] == 3


def test_values_json_cannot_hold_become_text_and_names_do_not_clash() -> None:
    """An address, bytes, NaN and an object are written as text; a field called
    ``time`` or ``namespace`` keeps its value under ``time_``/``namespace_``; an ``event`` field
    is the line's name."""
    class Odd:
        def __str__(self) -> str:
            return "odd!"

    (line,) = lines_of(lambda log: log.info(
        "{event} x", event="job.started", peer=IPv4Address("TCP", "10.0.0.1", 9),
        raw=b"\xffab", ratio=float("nan"), obj=Odd(), nested={"a": [1, Odd()]},
        time="noon", namespace="mine"))
    assert line["name"] == "job.started" and line["event"] == "job.started x"
    assert line["peer"] == str(IPv4Address("TCP", "10.0.0.1", 9))
    assert line["raw"] == "\\xffab" and line["ratio"] == "nan" and line["obj"] == "odd!"
    assert line["nested"] == {"a": [1, "odd!"]}
    assert line["time_"] == "noon" and line["namespace_"] == "mine"
    assert line["level"] == "info" and line["time"] != "noon"


def test_a_failure_carries_its_traceback_and_legacy_events_their_text() -> None:
    """``log.failure`` gives a traceback field; twisted.python.log.msg its message."""
    def emit(log: Logger) -> None:
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.failure("request.bug method={method}", method="start")
        legacy_log.msg("old style", system="legacy-sys")

    bug, old = lines_of(emit)
    assert bug["level"] == "critical" and bug["name"] == "request.bug"
    assert "ZeroDivisionError" in bug["traceback"] and bug["method"] == "start"
    assert old["event"] == "old style" and old["system"] == "legacy-sys"
    assert "message" not in old and "isError" not in old


def test_peers_print_as_host_and_port() -> None:
    """IPv4 ``host:port``, IPv6 ``[host]:port``, a UNIX socket its path."""
    assert host_port(IPv4Address("TCP", "127.0.0.1", 8443)) == "127.0.0.1:8443"
    assert host_port(IPv6Address("TCP", "::1", 8443)) == "[::1]:8443"
    assert host_port(UNIXAddress("/run/jw.sock")) == "/run/jw.sock"


def test_the_destination_is_twistds_own(tmp_path: Path) -> None:
    """``--logfile`` names a file (rotated on SIGUSR1 as twistd does), ``-n`` alone is
    stdout, ``--syslog`` is refused (None)."""
    import sys

    assert twistd_destination({"nodaemon": True, "logfile": None}) is sys.stdout
    assert twistd_destination({"syslog": True}) is None
    before = signal.getsignal(signal.SIGUSR1)
    try:
        out = twistd_destination({"logfile": str(tmp_path / "d.log")})
        assert out is not None
        out.write(event_as_json({"log_format": "hi", "log_level": LogLevel.info,
                                 "log_time": 0.0}))
        out.flush()
        assert json.loads((tmp_path / "d.log").read_text())["time"] == \
            "1970-01-01T00:00:00.000Z"
    finally:
        signal.signal(signal.SIGUSR1, before)


@pytest.fixture(scope="module")
def json_daemon(test_pki: PKI, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Daemon]:
    d = Daemon(test_pki, tmp_path_factory.mktemp("jsonlog") / "state",
               "--log-format", "json").start()
    yield d
    d.stop()


def test_every_line_of_a_json_daemons_log_is_an_object(json_daemon: Daemon) -> None:
    """A real daemon with --log-format json: each line (twistd's own start-up lines too)
    is one JSON object; a connection's end is a line with its identity, peer,
    duration, requests and why."""
    c = Conn(json_daemon)
    c.hello()
    c.call("whoami")
    c.sock.unwrap()
    c.close()

    def closed() -> dict[str, Any] | None:
        lines = [json.loads(line) for line in json_daemon.log().splitlines()]
        return next((line for line in lines if line.get("name") == "connection.closed"),
                    None)

    line = wait_for(closed, what="connection.closed in the log")
    assert line["identity"] == "alice" and line["requests"] == 2 and line["why"] == "closed"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", line["addr"])
    assert isinstance(line["duration"], float) and 0 <= line["duration"] < 60
    lines = [json.loads(text) for text in json_daemon.log().splitlines()]
    assert all({"time", "level", "event"} <= set(one) for one in lines)
    names = {one.get("name") for one in lines}
    assert {"jobworker.listening", "connection.open", "connection.closed"} <= names
    assert any("twistd" in one["event"] and "starting up" in one["event"] for one in lines)

