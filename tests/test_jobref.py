"""Job references: a full id, a pid, or a unique prefix of 8+ characters of an id,
resolved by the daemon among the jobs the caller may see."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon

from jobworker.client import BadRequest, Client, NotFound
from jobworker.daemon import jobref
from jobworker.jobs import sql

pytestmark = pytest.mark.timeout(60, method="thread")


class Jobs:
    """The three lookups resolve uses, over a dict of id -> owner."""

    def __init__(self, owners: dict[str, str], pids: dict[int, str]) -> None:
        self.owners, self.pids = owners, pids
        self.asked: list[tuple[str, str | None]] = []

    def find(self, ref: str | int) -> str:
        if isinstance(ref, int) or ref.isdecimal():
            if int(ref) in self.pids:
                return self.pids[int(ref)]
        elif ref in self.owners:
            return ref
        raise NotFound(f"no such job: {ref}")

    def ids_by_prefix(self, prefix: str, owner: str | None, limit: int) -> list[str]:
        self.asked.append((prefix, owner))
        return sorted(i for i, o in self.owners.items()
                      if i.startswith(prefix) and owner in (None, o))[:limit]

    def get(self, job_id: str) -> str:
        return job_id


A = "abcdef12-0000-4000-8000-000000000001"
B = "abcdef12-0000-4000-8000-000000000002"
C = "12345678-0000-4000-8000-000000000003"


@pytest.mark.parametrize("ref, owner, expected", [
    (A, None, A),                    # a full id
    (77, None, C),                   # a pid
    ("77", None, C),                 # digits are a pid
    ("abcdef12-0000-4000-8000-0000000000", None, BadRequest),  # both share this prefix
    ("abcdef12-0000-4000-8000-000000000001", "bob", A),       # a full id: authz decides
    ("abcdef12-0000-4000-8000-00000000000", "alice", A),      # only alice's among hers
    ("abcdef12", "carol", NotFound),  # no job of carol's has it
    ("abcdef1", None, NotFound),     # under 8 characters: no prefix lookup
    ("12345678", None, NotFound),    # all digits: a pid, never a prefix
    ("ABCDEF12-0000-4000-8000-000000000002"[:12], "bob", B),  # case does not matter
])
def test_resolve_takes_id_then_pid_then_a_unique_visible_prefix(
        ref: str | int, owner: str | None, expected: Any) -> None:
    """The steps in order, a prefix only among the owner's jobs, ambiguity a BadRequest."""
    jobs = Jobs({A: "alice", B: "bob", C: "alice"}, {77: C})
    if isinstance(expected, type):
        with pytest.raises(expected):
            jobref.resolve(jobs, ref, owner)  # type: ignore[arg-type]
    else:
        assert jobref.resolve(jobs, ref, owner) == expected  # type: ignore[arg-type]


def test_the_table_finds_ids_by_prefix_per_owner(tmp_path: Path) -> None:
    """ids_by_prefix on the real table: a range of the id index, filtered by owner."""
    conn = sql.connect(str(tmp_path / "jobs.db"))
    sql.migrate(conn, str(tmp_path / "jobs.db"))
    rows = [sql.Row(i, o, "exited", None, None, None, 1.0, 2.0, None, None, b"\x80")
            for i, o in ((A, "alice"), (B, "bob"), (C, "alice"))]
    sql.write(conn, rows)
    assert sql.ids_by_prefix(conn, "abcdef12", None, 5) == [A, B]
    assert sql.ids_by_prefix(conn, "abcdef12", "bob", 5) == [B]
    assert sql.ids_by_prefix(conn, "abcdef12", None, 1) == [A]
    assert sql.ids_by_prefix(conn, "abcdef13", None, 5) == []
    plan = " ".join(str(r) for r in conn.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE id >= ? AND id < ?", ("a", "b")))
    assert "USING COVERING INDEX" in plan or "USING INDEX" in plan, plan


def test_a_prefix_names_a_job_over_the_wire_and_in_jwclient(daemon: Daemon) -> None:
    """The daemon resolves a prefix among the caller's jobs: alice's own by 8 and by 13
    characters, in the API and in jwclient; bob gets 'no job'; an admin finds it."""
    pki_dir = str(daemon.pki.dir)
    with Client(daemon.address, pki=pki_dir, identity="alice") as alice:
        job = alice.start("true")
        while job.id[:8].isdecimal():  # all digits is a pid (1 id in 43): another one
            job = alice.start("true")
        assert alice.wait(job.id[:8]).id == job.id
        assert alice.status(job.id[:13]).id == job.id
    with Client(daemon.address, pki=pki_dir, identity="bob") as bob, \
            pytest.raises(NotFound, match=f"no job {job.id[:8]}"):
        bob.status(job.id[:8])
    with Client(daemon.address, pki=pki_dir, identity="admin") as admin:
        assert admin.status(job.id[:8]).owner == "alice"
    result = daemon.jwclient("status", job.id[:8], check=True)
    assert f"id:      {job.id}" in result.stdout.decode()
