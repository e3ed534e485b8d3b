"""The durable queue against a real daemon: limits counted off the process table under
concurrent starts, queued jobs followed and cancelled, and a queue in flight across a
SIGKILL and a graceful restart (nothing runs twice, nothing is forgotten)."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import PKI, TEST_IDENTITIES, Daemon, child_pids, dead, wait_for
from test_restart import list_all
from test_robustness import Conn

#: Identities starting jobs at once in the limits test (each its own certificate).
SUBMITTERS = ("alice", "bob", "admin", "qcarol", "qdave")


@pytest.fixture(scope="module")
def identities(test_pki: PKI) -> tuple[str, ...]:
    for name in SUBMITTERS:
        if name not in TEST_IDENTITIES:
            test_pki.client(name, "user")
    return SUBMITTERS


def policy(tmp_path: Path, extra: str = "") -> str:
    """A policy mapping every test identity to root (as conftest's default does) plus
    ``extra`` tables."""
    path = tmp_path / "queue-policy.toml"
    names = (*TEST_IDENTITIES, *SUBMITTERS)
    path.write_text("[run_as]\n" + "".join(f'{n} = "root"\n' for n in dict.fromkeys(names))
                    + extra)
    return str(path)


def connect(d: Daemon, identity: str = "alice") -> Conn:
    conn = Conn(d, identity)
    conn.hello()
    return conn


def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``: the daemon's jobs, read from
    /proc, not from the daemon."""
    return [child for child in child_pids(pid) if not dead(child)]


def test_never_more_than_max_running_under_concurrent_starts(
        test_pki: PKI, tmp_path: Path, identities: tuple[str, ...]) -> None:
    """--max-running 3, five identities starting 4 short jobs each at once: the process
    table never shows more than 3 jobs of the daemon, it does show 3, and all 20 run."""
    d = Daemon(test_pki, tmp_path / "state", "--max-running", "3",
               "--policy", policy(tmp_path)).start()
    try:
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], len(children(d.pid)))

        sampler = threading.Thread(target=sample)
        sampler.start()
        started: list[dict[str, Any]] = []

        def submit(identity: str) -> None:
            conn = connect(d, identity)
            try:
                for _ in range(4):
                    started.append(conn.call("start", {"command": "sleep",
                                                       "args": ["0.3"]}))
            finally:
                conn.close()

        threads = [threading.Thread(target=submit, args=(who,)) for who in identities]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(started) == 20
        assert sum(r["state"] == "queued" for r in started) >= 15
        admin = connect(d, "admin")
        ended = [admin.call("wait", {"job": r["id"]}) for r in started]
        admin.close()
        done.set()
        sampler.join(10)
        assert all(r["state"] == "exited" and r["exit_code"] == 0 for r in ended), ended
        assert peak[0] == 3, f"at most {peak[0]} jobs ran at once, expected 3"
        assert d.tracebacks() == []
    finally:
        d.stop()


def test_a_queued_job_is_listed_followed_waited_for_and_cancelled(
        test_pki: PKI, tmp_path: Path) -> None:
    """With the one slot taken: a queued job is listed by --state queued; logs -f of it
    waits for its start and then streams its output; stop of another queued job cancels
    it (wait returns cancelled, it never ran)."""
    d = Daemon(test_pki, tmp_path / "state", "--max-running", "1").start()
    try:
        conn = connect(d)
        blocker = conn.call("start", {"command": "sleep", "args": ["300"]})
        echo = conn.call("start", {"command": "echo", "args": ["from the queue"]})
        doomed = conn.call("start", {"command": "touch",
                                     "args": [str(tmp_path / "never")]})
        assert (echo["state"], echo["pid"], echo["started_at"], echo["log_dir"]) == (
            "queued", None, None, None) and echo["queued_at"]
        queued, _ = list_all(conn, state="queued")
        assert [r["id"] for r in queued] == [doomed["id"], echo["id"]]
        assert conn.call("queues", {})["queued"] == 2
        follower = connect(d)
        follower.send({"id": 7, "method": "logs", "params": {"job": echo["id"],
                                                             "follow": True}})
        waiter = connect(d)
        waiter.send({"id": 9, "method": "wait", "params": {"job": doomed["id"]}})
        cancelled = conn.call("stop", {"job": doomed["id"]})
        assert cancelled["state"] == "cancelled" and cancelled["started_at"] is None
        reply = waiter.read()
        assert reply["id"] == 9 and reply["result"]["state"] == "cancelled"
        conn.call("stop", {"job": blocker["id"], "grace": 1})
        out = b""
        while True:
            frame = follower.read()
            assert frame["id"] == 7, frame
            if "chunk" in frame:
                out += frame["chunk"]
            else:
                break
        assert out == b"from the queue\n", frame
        assert frame["result"]["record"]["state"] in ("running", "exited")
        assert not (tmp_path / "never").exists()
        for c in (conn, follower, waiter):
            c.close()
        assert d.tracebacks() == []
    finally:
        d.stop()


def marker_job(path: Path, hold: float) -> dict[str, Any]:
    """A job that appends its id to ``path``, then takes ``hold`` seconds."""
    return {"command": "sh", "args": ["-c", f'echo "$JOBWORKER_JOB_ID" >> {path}; '
                                            f"sleep {hold}"]}


def test_a_queue_in_flight_survives_a_sigkill_and_a_graceful_restart(
        test_pki: PKI, tmp_path: Path) -> None:
    """SIGKILL the daemon with one job running and seven queued (one of them after
    another): the next daemon adopts the running one and keeps the seven queued; they
    run one at a time, and a graceful
    stop in the middle leaves the rest queued for a third daemon.  In the end every job
    ran exactly once (each wrote its id once) and none is left queued or forgotten."""
    state = tmp_path / "state"
    ran = tmp_path / "ran"
    args = ("--max-running", "1")
    d = Daemon(test_pki, state, *args).start()
    conn = connect(d)
    blocker = conn.call("start", {"command": "sleep", "args": ["300"]})
    queued = [conn.call("start", marker_job(ran, 0.2)) for _ in range(6)]
    # Held for the first queued one: across the crash too.
    queued.append(conn.call("start", {**marker_job(ran, 0.2), "after": [queued[0]["id"]]}))
    conn.close()
    assert {r["state"] for r in queued} == {"queued"}
    d.signal(signal.SIGKILL)
    d.proc.wait(10)  # type: ignore[union-attr]

    d2 = Daemon(test_pki, state, *args).start()
    try:
        wait_for(lambda: "jobs.recovered lost=0 adopted=1" in d2.log()
                 and "jobs.requeued queued=7" in d2.log(), what="recovery")
        conn = connect(d2)
        assert conn.call("status", {"job": blocker["id"]})["state"] == "running"
        waiting, _ = list_all(conn, state="queued")
        assert len(waiting) == 7
        assert not ran.exists()  # the adopted job holds the one slot
        conn.call("stop", {"job": blocker["id"], "grace": 1})
        wait_for(lambda: ran.exists() and len(ran.read_text().split()) >= 2,
                 timeout=20, what="two queued jobs to run")
        conn.close()
    finally:
        d2.stop()  # graceful: the running one is stopped, the rest stay queued
    d3 = Daemon(test_pki, state, *args).start()
    try:
        conn = connect(d3)
        ended = [conn.call("wait", {"job": r["id"]}) for r in queued]
        conn.close()
        assert {r["state"] for r in ended} <= {"exited", "stopped"}, [
            (r["state"], r["error"]) for r in ended]
        ids = ran.read_text().split()
        assert sorted(ids) == sorted(r["id"] for r in queued), ids  # once each
        assert d3.tracebacks() == []
    finally:
        d3.stop()


def test_policy_queues_and_quotas_over_the_wire(test_pki: PKI, tmp_path: Path) -> None:
    """[queue.build] parallel = 1 and [quota.identity.alice] max_queued = 1: a second
    build job queues, a third is refused with unavailable naming max_queued, an unknown
    queue and a priority above max_priority are refused; queues reports the counts."""
    extra = ("[queue.build]\nparallel = 1\n"
             "[quota.identity.alice]\nmax_queued = 1\nmax_priority = 2\n")
    d = Daemon(test_pki, tmp_path / "state", "--policy", policy(tmp_path, extra)).start()
    try:
        conn = connect(d)
        sleep = {"command": "sleep", "args": ["300"]}
        first = conn.call("start", {**sleep, "queue": "build"})
        second = conn.call("start", {**sleep, "queue": "build", "priority": 2})
        assert (first["state"], second["state"]) == ("running", "queued")
        assert second["queue"] == "build" and second["priority"] == 2
        for params, code, words in (({**sleep, "queue": "build"}, "unavailable", "max_queued"),
                                    ({**sleep, "queue": "nope"}, "bad_request", "no such queue"),
                                    ({**sleep, "priority": 3}, "forbidden", "max_priority")):
            conn.send({"id": 99, "method": "start", "params": params})
            error = conn.read()["error"]
            assert error["code"] == code and words in error["message"], error
        other = conn.call("start", sleep)  # the default queue has no limit
        assert other["state"] == "running"
        counts = {q["queue"]: q for q in conn.call("queues", {})["queues"]}
        assert (counts["build"]["running"], counts["build"]["queued"],
                counts["build"]["parallel"]) == (1, 1, 1)
        for job in (second, first, other):
            conn.call("stop", {"job": job["id"], "grace": 1})
        conn.close()
        assert d.tracebacks() == []
    finally:
        d.stop()


def test_jwclient_start_queue_and_the_queue_command(test_pki: PKI, tmp_path: Path) -> None:
    """jwclient start --queue/--priority/--after/--name/--label reach the daemon,
    jwclient queue shows the counts and list --name/--label filters (the CLI itself is
    what is tested here)."""
    extra = "[queue.build]\nparallel = 1\n[quota.role.user]\nmax_priority = 1\n"
    d = Daemon(test_pki, tmp_path / "state", "--policy", policy(tmp_path, extra)).start()
    try:
        first = d.jwclient("start", "--queue", "build", "--", "sleep", "300",
                           check=True).stdout.decode().strip()
        second = d.jwclient("start", "--queue", "build", "--priority", "1", "--after",
                            first, "--name", "nightly", "--label", "team=infra", "sleep",
                            "300", check=True).stdout.decode().strip()
        shown = d.jwclient("queue", check=True).stdout.decode()
        assert any(line.split()[:4] == ["build", "1", "1", "1"]
                   for line in shown.splitlines()), shown
        listed = json.loads(d.jwclient("--json", "list", "--name", "nightly", "--label",
                                       "team=infra", check=True).stdout)
        assert [r["id"] for r in listed] == [second]
        record = listed[0]
        assert (record["state"], record["queue"], record["priority"], record["after"],
                record["labels"]) == ("queued", "build", 1, [first], {"team": "infra"})
        conn = connect(d)
        for job in (second, first):
            conn.call("stop", {"job": job, "grace": 1})
        conn.close()
    finally:
        d.stop()


def test_a_raised_limit_starts_queued_jobs_on_sighup(test_pki: PKI, tmp_path: Path) -> None:
    """Raising [queue.build] parallel and sending SIGHUP starts the jobs it now allows."""
    path = policy(tmp_path, "[queue.build]\nparallel = 1\n")
    d = Daemon(test_pki, tmp_path / "state", "--policy", path).start()
    try:
        conn = connect(d)
        jobs = [conn.call("start", {"command": "sleep", "args": ["300"], "queue": "build"})
                for _ in range(3)]
        assert [j["state"] for j in jobs] == ["running", "queued", "queued"]
        Path(path).write_text(Path(path).read_text().replace("parallel = 1",
                                                             "parallel = 3"))
        d.signal(signal.SIGHUP)
        wait_for(lambda: all(conn.call("status", {"job": j["id"]})["state"] == "running"
                             for j in jobs), what="the raised limit to apply")
        for job in jobs:
            conn.call("stop", {"job": job["id"], "grace": 1})
        conn.close()
    finally:
        d.stop()


def test_dependencies_over_the_wire(test_pki: PKI, tmp_path: Path) -> None:
    """after: an unknown job and another identity's job are refused like any unknown
    job; a job after one that exits 0 runs; one after a job that is stopped is
    cancelled, saying why."""
    d = Daemon(test_pki, tmp_path / "state").start()
    try:
        conn = connect(d)
        bob = connect(d, "bob")
        bobs = bob.call("start", {"command": "true"})
        for ref in ("no-such-job", bobs["id"]):
            conn.send({"id": 50, "method": "start", "params": {"command": "true",
                                                                "after": [ref]}})
            error = conn.read()["error"]
            assert error["code"] == "not_found" and ref in error["message"], error
        quick = conn.call("start", {"command": "sleep", "args": ["0.2"]})
        then = conn.call("start", {"command": "echo", "args": ["then"],
                                   "after": [quick["id"]]})
        assert then["state"] == "queued" and then["after"] == [quick["id"]]
        assert conn.call("wait", {"job": then["id"]})["state"] == "exited"
        long = conn.call("start", {"command": "sleep", "args": ["300"]})
        never = conn.call("start", {"command": "true", "after": [long["id"]]})
        conn.call("stop", {"job": long["id"], "grace": 1})
        ended = conn.call("wait", {"job": never["id"]})
        assert ended["state"] == "cancelled" and long["id"] in ended["error"], ended
        assert "stopped" in ended["error"] and ended["pid"] is None
        conn.close()
        bob.close()
        assert d.tracebacks() == []
    finally:
        d.stop()


def test_names_and_labels_over_the_wire(test_pki: PKI, tmp_path: Path) -> None:
    """A name is unique among the caller's queued and running jobs (another identity may
    use it; it is free again once the job ends), names a job wherever an id would, and
    list filters by name and by labels (every one given must match)."""
    d = Daemon(test_pki, tmp_path / "state").start()
    try:
        conn = connect(d)
        bob = connect(d, "bob")
        built = conn.call("start", {"command": "sleep", "args": ["300"], "name": "build",
                                    "labels": ["team=infra", "kind=ci"]})
        assert built["name"] == "build" and built["labels"] == {"team": "infra",
                                                                "kind": "ci"}
        conn.send({"id": 60, "method": "start", "params": {"command": "true",
                                                            "name": "build"}})
        error = conn.read()["error"]
        assert error["code"] == "bad_request" and built["id"] in error["message"], error
        assert bob.call("start", {"command": "true", "name": "build"})["owner"] == "bob"
        assert conn.call("status", {"job": "build"})["id"] == built["id"]
        other = conn.call("start", {"command": "true", "labels": ["team=infra"]})
        conn.call("wait", {"job": other["id"]})
        infra, _ = list_all(conn, labels=["team=infra"])
        assert [r["id"] for r in infra] == [other["id"], built["id"]]
        both, _ = list_all(conn, labels=["team=infra", "kind=ci"])
        named, _ = list_all(conn, name="build")
        assert [r["id"] for r in both] == [r["id"] for r in named] == [built["id"]]
        assert list_all(conn, labels=["team=infr"])[0] == []  # whole labels only
        conn.call("stop", {"job": "build", "grace": 1})
        again = conn.call("start", {"command": "true", "name": "build"})
        assert conn.call("wait", {"job": "build"})["id"] == again["id"]
        conn.close()
        bob.close()
        assert d.tracebacks() == []
    finally:
        d.stop()


def test_a_queued_job_caught_leaving_the_queue_by_a_crash_is_not_run_again(
        test_pki: PKI, tmp_path: Path) -> None:
    """The window between a queued job's log folder being made (just before its spawn)
    and its new state being committed: after a SIGKILL there, the next daemon finds the
    job queued in the table but with a folder, looks for its process, and, finding none,
    records it lost; it never runs it (again)."""
    state = tmp_path / "state"
    ran = tmp_path / "ran"
    d = Daemon(test_pki, state, "--max-running", "1").start()
    conn = connect(d)
    conn.call("start", {"command": "sleep", "args": ["300"]})
    caught = conn.call("start", marker_job(ran, 0))
    conn.close()
    d.signal(signal.SIGKILL)
    d.proc.wait(10)  # type: ignore[union-attr]
    # As the daemon leaves it when killed just after making the folder: empty logs.
    folder = state / "logs" / f"{caught['id']}-20261201T000000.000000Z"
    folder.mkdir()
    for name in ("stdout.log", "stderr.log"):
        (folder / name).touch()
    d2 = Daemon(test_pki, state, "--max-running", "1").start()
    try:
        wait_for(lambda: "jobs.recovered lost=1 adopted=1" in d2.log(), what="recovery")
        conn = connect(d2)
        record = conn.call("status", {"job": caught["id"]})
        assert record["state"] == "lost" and "starting" in record["error"], record
        assert record["log_dir"] == str(folder)
        assert conn.call("queues", {})["queued"] == 0
        conn.close()
        assert not ran.exists()
    finally:
        d2.stop()


def test_bobs_one_job_waits_at_most_one_turn_behind_alices_fifty(
        test_pki: PKI, tmp_path: Path) -> None:
    """--max-running 1 held by a blocker; alice queues 50 jobs, then bob one: once the
    slot frees, at most one of alice's starts before bob's (by their records), and hers
    start in the order she queued them."""
    d = Daemon(test_pki, tmp_path / "state", "--max-running", "1").start()
    try:
        conn = connect(d, "alice")
        blocker = conn.call("start", {"command": "sleep", "args": ["300"]})
        alices = [conn.call("start", {"command": "true"}) for _ in range(50)]
        bob = connect(d, "bob")
        bobs = bob.call("start", {"command": "true"})
        conn.call("stop", {"job": blocker["id"], "grace": 1})
        theirs = [conn.call("wait", {"job": j["id"]}) for j in alices]
        his = bob.call("wait", {"job": bobs["id"]})
        before = [j for j in theirs if j["started_at"] < his["started_at"]]
        assert len(before) <= 1, (len(before), his["started_at"])
        assert sorted(theirs, key=lambda j: j["started_at"]) == theirs
        conn.close()
        bob.close()
    finally:
        d.stop()


def test_start_many_answers_each_start_in_order(test_pki: PKI, tmp_path: Path) -> None:
    """start_many: each map is a start of its own, answered in order: records (queued
    past --max-running) and, for the bad ones, their own typed errors; the rest start."""
    d = Daemon(test_pki, tmp_path / "state", "--max-running", "1").start()
    try:
        conn = connect(d)
        reply = conn.call("start_many", {"jobs": [
            {"command": "sleep", "args": ["300"]},
            {"command": "true", "name": "second"},
            {"command": "true", "queue": "nope"},
            {"command": 5},
            {"command": "true", "after": ["no-such-job"]},
            {"command": "true"},
        ]})["jobs"]
        assert [r.get("state") for r in reply] == ["running", "queued", None, None, None,
                                                   "queued"]
        assert [r["error"]["code"] for r in reply[2:5]] == ["bad_request", "bad_request",
                                                            "not_found"]
        assert reply[1]["name"] == "second"
        conn.call("stop", {"job": reply[0]["id"], "grace": 1})
        assert conn.call("wait", {"job": reply[5]["id"]})["state"] == "exited"
        conn.send({"id": 70, "method": "start_many", "params": {"jobs": [{}] * 257}})
        assert conn.read()["error"]["code"] == "bad_request"
        conn.close()
        assert d.tracebacks() == []
    finally:
        d.stop()
