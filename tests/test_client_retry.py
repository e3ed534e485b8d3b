"""``jwclient start`` after a dropped connection: it reconnects and sends the same
request_id, so the daemon starts the program once."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import pytest_twisted

from jobworker.client import commands
from jobworker.client.api import ClientConfig, ClientError
from jobworker.wire.errors import ConnectionLost
from jobworker.wire.record import JobRecord

RECORD = {"id": "j1", "pid": 7, "command": "true", "args": [], "dir": "/", "owner": "alice",
          "state": "running", "exit_code": None, "signal": None, "error": None,
          "started_at": "2026-12-01T00:00:00Z", "ended_at": None, "log_dir": "/x"}


class Session:
    """A client whose first ``fail`` starts lose the connection."""

    def __init__(self, sent: list[str | None], fail: int) -> None:
        self.config = ClientConfig("127.0.0.1:1", "ca", "cert", "key")
        self.sent = sent
        self.fail = fail

    async def start(self, *args: Any, request_id: str | None = None, **kw: Any) -> JobRecord:
        self.sent.append(request_id)
        if len(self.sent) <= self.fail:
            raise ConnectionLost("connection lost: dropped")
        return JobRecord.from_wire(RECORD)


def args() -> argparse.Namespace:
    return argparse.Namespace(program="true", args=[], env=[], dir=None, timeout=None,
                              connect_timeout=1.0, json=False)


@pytest_twisted.ensureDeferred
async def test_a_dropped_start_is_retried_with_the_same_request_id(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from twisted.internet import reactor

    sent: list[str | None] = []
    sessions = []

    async def connect(*a: Any, **kw: Any) -> Session:
        sessions.append(Session(sent, fail=2))
        return sessions[-1]

    monkeypatch.setattr(commands, "connect", connect)
    assert await commands.start(reactor, Session(sent, fail=2), args()) == 0  # type: ignore[arg-type]
    assert len(sent) == 3 and len(set(sent)) == 1 and sent[0]
    assert len(sessions) == 2
    assert capsys.readouterr().out == "j1\n"


@pytest_twisted.ensureDeferred
async def test_start_gives_up_after_its_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.internet import reactor

    async def connect(*a: Any, **kw: Any) -> Session:
        raise ClientError("cannot connect to 127.0.0.1:1: refused")

    monkeypatch.setattr(commands, "connect", connect)
    monkeypatch.setattr(commands, "START_RETRIES", 2)
    with pytest.raises(ClientError, match="refused"):
        await commands.start(reactor, Session([], fail=9), args())  # type: ignore[arg-type]
