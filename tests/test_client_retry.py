"""``jwclient start`` after a dropped connection: it reconnects and sends the same
request_id, so the daemon starts the program once."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from jobworker.client import commands
from jobworker.client.endpoint import ClientConfig, ClientError
from jobworker.wire.errors import ConnectionLost

RECORD = {"id": "j1", "pid": 7, "command": "true", "args": [], "dir": "/", "owner": "alice",
          "state": "running", "exit_code": None, "signal": None, "error": None,
          "started_at": "2026-12-01T00:00:00Z", "ended_at": None, "log_dir": "/x"}


class Session:
    """A client whose first ``fail`` starts lose the connection."""

    def __init__(self, sent: list[str | None], fail: int) -> None:
        self.config = ClientConfig("127.0.0.1:1", "ca", "cert", "key")
        self.sent = sent
        self.fail = fail

    def call(self, method: str, params: dict[str, Any]) -> Any:
        assert method == "start"
        self.sent.append(params.get("request_id"))
        if len(self.sent) <= self.fail:
            raise ConnectionLost("connection lost: dropped")
        return RECORD


def args() -> argparse.Namespace:
    return argparse.Namespace(program="true", args=[], env=[], dir=None, timeout=None,
                              connect_timeout=1.0, json=False)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backoff between attempts is real time; these tests need none of it."""
    monkeypatch.setattr(commands.time, "sleep", lambda seconds: None)


def test_a_dropped_start_is_retried_with_the_same_request_id(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Two dropped connections, then a reply: three sends of one request_id, two reconnects."""
    sent: list[str | None] = []
    sessions = []

    def connect(*a: Any, **kw: Any) -> Session:
        sessions.append(Session(sent, fail=2))
        return sessions[-1]

    monkeypatch.setattr(commands, "connect", connect)
    assert commands.start(Session(sent, fail=2), args()) == 0  # type: ignore[arg-type]
    assert len(sent) == 3 and len(set(sent)) == 1 and sent[0]
    assert len(sessions) == 2
    assert capsys.readouterr().out == "j1\n"


def test_start_gives_up_after_its_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """No connection can be made again: the last ClientError, not a hang."""
    def connect(*a: Any, **kw: Any) -> Session:
        raise ClientError("cannot connect to 127.0.0.1:1: refused")

    monkeypatch.setattr(commands, "connect", connect)
    monkeypatch.setattr(commands, "START_RETRIES", 2)
    with pytest.raises(ClientError, match="refused"):
        commands.start(Session([], fail=9), args())  # type: ignore[arg-type]
