"""The crash test of the durable table: 5 clients start 200 short and 20 long jobs, the
daemon is SIGKILLed in the middle and started again, and the clients retry what they had
not been answered (with the same request_id).  Every job id a client was given is then
listed exactly once, with a truthful state and byte-exact logs; no program ran twice; the
long jobs were adopted and can be stopped."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from conftest import PKI, Daemon, dead, wait_for
from test_robustness import Conn

CLIENTS = 5
SHORT = 40  # per client
LONG = 4    # per client


class Client(threading.Thread):
    """Starts its jobs one after another; on a lost connection, reconnects (to whatever
    daemon is listening on ``port()``) and retries the same start."""

    def __init__(self, n: int, daemon: list[Daemon], marks: Path) -> None:
        super().__init__(daemon=True)
        self.n = n
        self.daemon_ref = daemon
        self.marks = marks
        self.given: dict[str, dict[str, Any]] = {}  # request id -> record
        self.retries = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = self._connect()
            for i in range(SHORT + LONG):
                key = f"c{self.n}-j{i}"
                if i % ((SHORT + LONG) // LONG) == 0:
                    params = {"command": "sh", "args": ["-c", f"echo {key} >> {self.marks}/"
                                                        f"{key}; echo {key}; exec sleep 300"]}
                else:
                    params = {"command": "sh", "args": ["-c", f"echo {key} >> {self.marks}/"
                                                        f"{key}; printf '{key}\\n%.0s' 1 2 3"]}
                params["request_id"] = key
                while True:
                    try:
                        self.given[key] = conn.call("start", params)
                        break
                    except (OSError, EOFError):
                        self.retries += 1
                        conn = self._connect()
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            self.error = e

    def _connect(self) -> Conn:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = Conn(self.daemon_ref[0])
                conn.hello()
                return conn
            except (OSError, EOFError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # a new daemon is on its way: poll its port


def test_sigkill_in_the_middle_loses_no_job_and_runs_none_twice(
        test_pki: PKI, tmp_path: Path) -> None:
    state = tmp_path / "state"
    marks = tmp_path / "marks"
    marks.mkdir()
    current = [Daemon(test_pki, state).start()]
    first = current[0]
    clients = [Client(n, current, marks) for n in range(CLIENTS)]
    for c in clients:
        c.start()
    wait_for(lambda: sum(len(c.given) for c in clients) >= 60, 60, what="60 starts")
    first.signal(signal.SIGKILL)
    first.proc.wait(10)  # type: ignore[union-attr]
    given_before = sum(len(c.given) for c in clients)
    second = Daemon(test_pki, state)
    second.port = first.port
    # The same port, so the clients find it: listen on it explicitly.
    second.args += ["--listen", f"tcp:{first.port}:interface=127.0.0.1"]
    second.start()
    current[0] = second
    try:
        for c in clients:
            c.join(120)
            assert not c.is_alive() and c.error is None, c.error
        given = {key: rec for c in clients for key, rec in c.given.items()}
        assert len(given) == CLIENTS * (SHORT + LONG)
        assert given_before < len(given)  # the crash really was in the middle
        assert sum(c.retries for c in clients) >= 1  # and starts were retried across it

        admin = Conn(second, "admin")
        admin.hello()
        listed: list[dict[str, Any]] = []
        rid = 1000
        admin.send({"id": rid, "method": "list", "params": {}})
        while True:
            frame = admin.read()
            if "chunk" in frame:
                listed.extend(frame["chunk"])
            else:
                break
        ids = [r["id"] for r in listed]
        assert len(ids) == len(set(ids))  # each once
        assert {rec["id"] for rec in given.values()} == set(ids)

        long_ones = {key: rec for key, rec in given.items() if "sleep" in
                     " ".join(rec["args"])}
        assert len(long_ones) == CLIENTS * LONG
        by_id = {r["id"]: r for r in listed}
        never_ran = 0
        for key, rec in given.items():
            final = admin.call("wait", {"job": rec["id"]}) if key not in long_ones else \
                by_id[rec["id"]]
            # No program ran twice, whatever the retries.
            ran = (marks / key).read_text() if (marks / key).exists() else ""
            assert ran in ("", f"{key}\n"), key
            if not ran:
                # Committed, then the daemon died before it spawned the program: the
                # record says so, and the retry did not run it either.
                assert final["state"] == "lost" and final["pid"] is None, final
                assert "starting" in final["error"]
                never_ran += 1
                continue
            if key in long_ones:
                assert final["state"] == "running", key
                continue
            assert final["state"] in ("exited", "lost"), final
            if final["state"] == "exited":
                assert final["exit_code"] == 0
            else:  # ended while no daemon watched it: said so, never made up
                assert final["exit_code"] is None and final["error"]
            out = Path(final["log_dir"]) / "stdout.log"
            assert out.read_bytes() == f"{key}\n".encode() * 3, key
        assert never_ran <= CLIENTS  # at most the one start each client had in flight
        for rec in long_ones.values():
            if by_id[rec["id"]]["pid"] is None:
                continue
            stopped = admin.call("stop", {"job": rec["id"], "grace": 2})
            assert stopped["state"] == "stopped"
            wait_for(lambda rec=rec: dead(rec["pid"]), what="long job to end")
        assert second.tracebacks() == []
    finally:
        for c in clients:
            for rec in c.given.values():
                if rec.get("pid"):
                    try:
                        os.killpg(rec["pid"], signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
        second.stop()
