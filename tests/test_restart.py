"""The durable job table against a real daemon: what a restart, a SIGKILL or a second
daemon on the same state directory leave of the jobs clients were told about."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BIN, PKI, Daemon, dead, wait_for
from test_robustness import Conn


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """Job pids a test started: killed at the end if a failed test left them running."""
    started: list[int] = []
    yield started
    for pid in started:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def start_json(d: Daemon, *args: str, identity: str = "alice", **params: Any
               ) -> dict[str, Any]:
    """Start a job over the wire (jwclient's own start is tested elsewhere: a process
    each would cost this file most of its time)."""
    conn = Conn(d, identity)
    try:
        conn.hello()
        return conn.call("start", {"command": args[0], "args": list(args[1:]),  # type: ignore[no-any-return]
                                   **params})
    finally:
        conn.close()


def status(d: Daemon, job: str, identity: str = "alice") -> dict[str, Any]:
    conn = Conn(d, identity)
    try:
        conn.hello()
        return conn.call("status", {"job": job})  # type: ignore[no-any-return]
    finally:
        conn.close()


def list_all(conn: Conn, **params: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every record of one ``list`` call, and its final reply."""
    rid, conn.next_id = conn.next_id, conn.next_id + 1
    conn.send({"id": rid, "method": "list", "params": params})
    records: list[dict[str, Any]] = []
    while True:
        frame = conn.read()
        assert frame["id"] == rid, frame
        if "chunk" in frame:
            records.extend(frame["chunk"])
        elif "error" in frame:
            raise AssertionError(frame["error"])
        else:
            return records, frame["result"]


def test_sigkill_then_restart_adopts_running_jobs_and_marks_gone_ones_lost(
        test_pki: PKI, state: Path, pids: list[int]) -> None:
    """SIGKILL the daemon with 10 jobs running: the next daemon lists every one, adopts the
    8 still running (stoppable, followable) and records the 2 that ended meanwhile lost."""
    d = Daemon(test_pki, state).start()
    jobs = [start_json(d, "sleep", "300") for _ in range(7)]
    jobs.append(start_json(d, "sleep", "300", memory=64 << 20, pids=32))
    assert jobs[-1]["limits"]["memory"] == 64 << 20
    short = [start_json(d, "sleep", "301") for _ in range(2)]
    ended = start_json(d, "echo", "history")
    wait_for(lambda: status(d, ended["id"])["state"] == "exited", what="echo to end")
    pids.extend(j["pid"] for j in jobs + short)
    d.signal(signal.SIGKILL)
    d.proc.wait(10)  # type: ignore[union-attr]
    for j in short:  # end while no daemon watches them
        os.killpg(j["pid"], signal.SIGTERM)
        wait_for(lambda j=j: dead(j["pid"]), what="short job to end")
    assert all(not dead(j["pid"]) for j in jobs)

    d2 = Daemon(test_pki, state).start()
    try:
        wait_for(lambda: "jobs.recovered lost=2 adopted=8" in d2.log(), what="recovery")
        for j in jobs:
            s = status(d2, j["id"])
            assert (s["state"], s["pid"], s["started_at"]) == ("running", j["pid"],
                                                                j["started_at"])
            assert s["limits"] == j["limits"]  # what its cgroup still applies
        for j in short:
            s = status(d2, j["id"])
            assert s["state"] == "lost" and s["ended_at"] and "exit status" in s["error"]
        assert status(d2, ended["id"])["state"] == "exited"
        assert d2.jwclient("logs", ended["id"], check=True).stdout == b"history\n"
        # Adopted jobs are stoppable: the whole of each ends, and its record says so.
        conn = Conn(d2)
        conn.hello()
        for j in jobs:
            stopped = conn.call("stop", {"job": j["id"], "grace": 2})
            assert stopped["state"] == "stopped" and "adopted" in stopped["error"]
            wait_for(lambda j=j: dead(j["pid"]), what="adopted job to end")
        conn.close()
        # bob sees none of alice's jobs, adopted or not.
        assert d2.jwclient("status", jobs[0]["id"], identity="bob").returncode != 0
        assert d2.tracebacks() == []
    finally:
        d2.stop()


def test_an_adopted_job_that_ends_by_itself_is_recorded(test_pki: PKI, state: Path,
                                                         pids: list[int]) -> None:
    d = Daemon(test_pki, state).start()
    job = start_json(d, "sleep", "302")
    pids.append(job["pid"])
    d.signal(signal.SIGKILL)
    d.proc.wait(10)  # type: ignore[union-attr]
    d2 = Daemon(test_pki, state).start()
    try:
        assert status(d2, job["id"])["state"] == "running"
        os.killpg(job["pid"], signal.SIGTERM)
        waited = json.loads(d2.jwclient("--json", "wait", job["id"], check=False).stdout)
        assert waited["state"] == "lost" and "adopted" in waited["error"]
        assert waited["ended_at"] is not None
    finally:
        d2.stop()


def test_a_reused_pid_is_never_adopted(test_pki: PKI, state: Path) -> None:
    """A job recorded running whose pid now names a process that started later (here:
    a row whose recorded start time is a day before the real one) is lost, never signalled."""
    import sqlite3

    d = Daemon(test_pki, state).start()
    job = start_json(d, "sleep", "300")

    def pid_recorded() -> bool:  # the pid goes with the batch after the start's reply
        db = sqlite3.connect(state / "jobs.db")
        try:
            row = db.execute("SELECT proc_start FROM jobs WHERE id = ?",
                             (job["id"],)).fetchone()
        finally:
            db.close()
        return row is not None and row[0] is not None

    wait_for(pid_recorded, what="the pid in the table")
    d.signal(signal.SIGKILL)
    d.proc.wait(10)  # type: ignore[union-attr]
    try:
        db = sqlite3.connect(state / "jobs.db")
        day = 100 * 86400
        db.execute("UPDATE jobs SET proc_start = proc_start - ?, proc_start_hi = "
                   "proc_start_hi - ? WHERE id = ?", (day, day, job["id"]))
        db.commit()
        db.close()
        d2 = Daemon(test_pki, state).start()
        try:
            assert status(d2, job["id"])["state"] == "lost"
            d2.jwclient("stop", job["id"])
            assert not dead(job["pid"])  # not ours to signal any more
        finally:
            d2.stop()
    finally:
        os.killpg(job["pid"], signal.SIGKILL)


def test_a_graceful_restart_keeps_the_history(test_pki: PKI, state: Path) -> None:
    d = Daemon(test_pki, state).start()
    done = [start_json(d, "sh", "-c", f"echo out{i}; echo err{i} >&2; exit {i}")
            for i in range(5)]
    long = start_json(d, "sleep", "300")
    for j in done:
        wait_for(lambda j=j: status(d, j["id"])["state"] == "exited", what="job to end")
    assert d.stop() in (0, -signal.SIGTERM)  # twistd ends by the signal it got
    d2 = Daemon(test_pki, state).start()
    try:
        for i, j in enumerate(done):
            s = status(d2, j["id"])
            assert (s["state"], s["exit_code"]) == ("exited", i)
            assert d2.jwclient("logs", j["id"], check=True).stdout == f"out{i}\n".encode()
            assert d2.jwclient("logs", "--stderr", j["id"],
                               check=True).stdout == f"err{i}\n".encode()
        assert status(d2, long["id"])["state"] == "stopped"  # stopped at shutdown
        listed = json.loads(d2.jwclient("--json", "list", check=True).stdout)
        assert [r["id"] for r in listed] == [long["id"]] + [j["id"] for j in reversed(done)]
    finally:
        d2.stop()


def test_a_second_daemon_on_the_same_state_directory_exits_at_once(
        test_pki: PKI, state: Path) -> None:
    d = Daemon(test_pki, state).start()
    try:
        second = subprocess.run(
            [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "jobworker", "--pki",
             str(test_pki.dir), "--state-dir", str(state), "--listen",
             "tcp:0:interface=127.0.0.1"], capture_output=True, timeout=30)
        assert second.returncode == 1
        lines = second.stderr.decode().strip().splitlines()
        assert lines == [f"twistd jobworker: --state-dir: another jobworker daemon (pid {d.pid}) is "
                         f"using {state}"], second.stderr
        job = start_json(d, "echo", "still mine")  # the first one is untouched
        wait_for(lambda: status(d, job["id"])["state"] == "exited", what="job to end")
        assert d.jwclient("logs", job["id"], check=True).stdout == b"still mine\n"
    finally:
        d.stop()


def test_a_retried_start_returns_the_first_job_and_runs_nothing_twice(
        test_pki: PKI, state: Path, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    d = Daemon(test_pki, state).start()
    params = {"command": "sh", "args": ["-c", f"echo x >> {marker}"],
              "request_id": "req-1"}
    try:
        conn = Conn(d)
        conn.hello()
        first = conn.call("start", params)
        again = conn.call("start", params)
        assert again["id"] == first["id"]
        conn.send({"id": 99, "method": "start",
                   "params": {**params, "args": ["-c", "echo other"]}})
        reply = conn.read()
        assert reply["error"]["code"] == "bad_request"
        assert "req-1" in reply["error"]["message"] and first["id"] in reply["error"]["message"]
        # Another identity's key is its own.
        bob = Conn(d, "bob")
        bob.hello()
        assert bob.call("start", params)["id"] != first["id"]
        wait_for(lambda: marker.exists() and marker.read_text().count("x") == 2,
                 what="both jobs to run")
        d.stop()
        d = Daemon(test_pki, state).start()
        conn = Conn(d)
        conn.hello()
        assert conn.call("start", params)["id"] == first["id"]  # across a restart too
        assert marker.read_text() == "x\nx\n"
    finally:
        d.stop()


def test_list_pages_newest_first_with_filters(test_pki: PKI, state: Path) -> None:
    d = Daemon(test_pki, state).start()
    try:
        conn = Conn(d)
        conn.hello()
        ids = [conn.call("start", {"command": "true"})["id"] for _ in range(25)]
        bob = Conn(d, "bob")
        bob.hello()
        bobs = bob.call("start", {"command": "sleep", "args": ["300"]})["id"]
        seen, cursor = [], None
        while True:
            params: dict[str, Any] = {"limit": 10}
            if cursor is not None:
                params["cursor"] = cursor
            records, final = list_all(conn, **params)
            assert final["count"] == len(records) <= 10
            seen.extend(r["id"] for r in records)
            cursor = final.get("next_cursor")
            if cursor is None:
                break
        assert seen == ids[::-1]  # alice's only, each once, newest first
        admin = Conn(d, "admin")
        admin.hello()
        records, _ = list_all(admin, state="running")
        assert [r["id"] for r in records] == [bobs]
        records, _ = list_all(admin, owner="bob")
        assert [r["id"] for r in records] == [bobs]
        records, final = list_all(admin, limit=3)
        assert len(records) == 3 and "next_cursor" in final
        records, _ = list_all(conn, owner="bob")  # not alice's to see
        assert records == []
        records, _ = list_all(admin, since=1e10)
        assert records == []
        conn.send({"id": 77, "method": "list", "params": {"cursor": "x1"}})
        assert conn.read()["error"]["code"] == "bad_request"
        admin.call("stop", {"job": bobs, "grace": 1})
    finally:
        d.stop()


def test_jwclient_list_shows_the_newest_100_and_says_when_more_exist(
        test_pki: PKI, state: Path) -> None:
    d = Daemon(test_pki, state).start()
    try:
        conn = Conn(d)
        conn.hello()
        ids = [conn.call("start", {"command": "true"})["id"] for _ in range(105)]
        shown = d.jwclient("--json", "list", check=True)
        assert [r["id"] for r in json.loads(shown.stdout)] == ids[:4:-1]
        assert shown.stderr == (b"jwclient: showing the newest 100 jobs; more exist "
                                b"(--limit N, or --all)\n")
        every = d.jwclient("--json", "list", "--all", check=True)
        assert [r["id"] for r in json.loads(every.stdout)] == ids[::-1]
        assert every.stderr == b""
        three = d.jwclient("--json", "list", "--limit", "3", "--state", "exited",
                           "--since", "1h", check=True)
        assert [r["id"] for r in json.loads(three.stdout)] == ids[:-4:-1]
        assert json.loads(d.jwclient("--json", "list", "--owner", "bob",
                                     check=True).stdout) == []
        assert json.loads(d.jwclient("--json", "list", "--until", "1d",
                                     check=True).stdout) == []
        assert d.jwclient("list", "--limit", "0").returncode == 2
    finally:
        d.stop()


def test_retention_forget_and_the_log_cap(test_pki: PKI, state: Path) -> None:
    """--max-history keeps the newest ended jobs (record and logs); forget removes one of
    your own, not another's and not a running one; --max-log-bytes stops a job whose logs
    pass the cap and keeps what it wrote."""
    d = Daemon(test_pki, state, "--max-history", "3", "--max-log-bytes", "64K").start()
    try:
        conn = Conn(d)
        conn.hello()
        jobs = [conn.call("start", {"command": "echo", "args": [str(i)]}) for i in range(6)]
        for j in jobs:
            wait_for(lambda j=j: status(d, j["id"])["state"] == "exited", what="job end")
        d.stop()
        d = Daemon(test_pki, state, "--max-history", "3", "--max-log-bytes", "64K").start()
        wait_for(lambda: "retention.removed jobs=3 log_dirs=3" in d.log(), what="retention")
        for j in jobs[:3]:
            assert d.jwclient("status", j["id"]).returncode != 0
            assert not Path(j["log_dir"]).exists()
        assert [status(d, j["id"])["state"] for j in jobs[3:]] == ["exited"] * 3

        victim = jobs[5]
        refused = d.jwclient("forget", victim["id"], identity="bob")
        assert refused.returncode != 0 and f"no job {victim['id']}".encode() in refused.stderr
        running = start_json(d, "sleep", "300")
        busy = d.jwclient("forget", running["id"])
        assert busy.returncode != 0 and b"running" in busy.stderr
        assert d.jwclient("forget", victim["id"]).returncode == 0
        assert d.jwclient("status", victim["id"]).returncode != 0
        assert not Path(victim["log_dir"]).exists()
        assert "outcome=forgotten" in (state / "audit.log").read_text() or \
            '"forgotten"' in (state / "audit.log").read_text()

        loud = start_json(d, "sh", "-c", "yes | head -c 1000000; sleep 300")
        ended = json.loads(d.jwclient("--json", "wait", loud["id"]).stdout)
        assert ended["state"] == "stopped" and "--max-log-bytes" in ended["error"]
        size = (Path(loud["log_dir"]) / "stdout.log").stat().st_size
        assert 64 * 1024 < size <= 1_000_000
        d.jwclient("stop", "--grace", "1", running["id"], check=True)
        assert d.tracebacks() == []
    finally:
        d.stop()


def test_an_adopted_job_is_stopped_whole_through_its_cgroup(test_pki: PKI, state: Path,
                                                            pids: list[int]) -> None:
    """After a SIGKILL, the restarted daemon (same state, same cgroup subtree) adopts a job
    with its cgroup: a stop ends its setsid child too, which its process group would miss."""
    d = Daemon(test_pki, state).start()
    job = start_json(d, "sh", "-c", "setsid sleep 303 & echo $!; exec sleep 304")
    out = Path(job["log_dir"]) / "stdout.log"
    child = int(wait_for(lambda: out.read_text().strip(), what="the child's pid"))
    pids += [job["pid"], child]
    d.signal(signal.SIGKILL)
    d.proc.wait(10)  # type: ignore[union-attr]
    d2 = Daemon(test_pki, state, "--cgroup-root-name", d.cgroup_name).start()
    try:
        line = wait_for(lambda: re.search(r"job\.adopted job=\S+ pid=\d+ owner=\S+ "
                                          r"cgroup=(\w+)", d2.log()), what="adoption")
        if line.group(1) != "True":
            pytest.skip("no cgroups here: an adopted job is stopped by its process group")
        stopped = json.loads(d2.jwclient("--json", "stop", "--grace", "2", job["id"],
                                         check=True).stdout)
        assert stopped["state"] == "stopped"
        wait_for(lambda: dead(child) and dead(job["pid"]), what="the whole job to end")
    finally:
        d2.stop()
