"""Every SQL statement of the job table, ``<state-dir>/jobs.db``: its schema, the
migrations between versions, and the queries.

Plain functions on a ``sqlite3`` connection: which thread runs them is the store's
business (``jobworker.jobs.durable``).  A row keeps a job's whole record as the msgpack map
a client receives (``record``), beside the columns the queries filter on.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

#: Each entry takes the schema from version ``i`` to ``i + 1`` (``PRAGMA user_version``).
#: Append, never edit: a table made by an older daemon is migrated up on open.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- start order; list cursors; never reused
        id TEXT NOT NULL UNIQUE,
        owner TEXT NOT NULL,
        state TEXT NOT NULL,
        pid INTEGER,
        proc_start INTEGER,    -- the earliest and latest start time the process can
        proc_start_hi INTEGER, -- have (/proc/<pid>/stat field 22, clock ticks after boot)
        started REAL NOT NULL,
        ended REAL,
        request_id TEXT,       -- a client's retry key, with the digest of what it asked
        request_digest BLOB,
        record BLOB NOT NULL   -- the job's record, msgpack, exactly as sent to clients
    );
    CREATE UNIQUE INDEX jobs_request ON jobs (owner, request_id)
        WHERE request_id IS NOT NULL;
    CREATE INDEX jobs_pid ON jobs (pid) WHERE pid IS NOT NULL;
    CREATE INDEX jobs_owner ON jobs (owner);
    CREATE INDEX jobs_state ON jobs (state);
    CREATE INDEX jobs_ended ON jobs (ended) WHERE ended IS NOT NULL;
    """,
    # 2: scheduling.  ``started`` of a queued job is when it was admitted, until it starts.
    """
    ALTER TABLE jobs ADD COLUMN launch BLOB;  -- a queued job's env and credentials (msgpack)
    ALTER TABLE jobs ADD COLUMN name TEXT;
    ALTER TABLE jobs ADD COLUMN labels TEXT;  -- "\nkey=value\n..." for list's filter
    CREATE INDEX jobs_name ON jobs (owner, name) WHERE name IS NOT NULL;
    """,
)
VERSION = len(MIGRATIONS)


class TableError(Exception):
    """The table cannot be used (made by a newer daemon, corrupt, unreadable)."""


class Row(NamedTuple):
    """What the store writes for one job."""

    id: str
    owner: str
    state: str
    pid: int | None
    proc_start: int | None
    proc_start_hi: int | None
    started: float
    ended: float | None
    request_id: str | None
    request_digest: bytes | None
    record: bytes
    launch: bytes | None = None
    name: str | None = None
    labels: str | None = None


class Unfinished(NamedTuple):
    """A job the table says was running: to reconcile with the machine at start-up."""

    seq: int
    id: str
    pid: int | None
    proc_start: int | None
    proc_start_hi: int | None
    started: float
    record: bytes


def connect(path: str, *, fsync: bool = False, check_same_thread: bool = True
            ) -> sqlite3.Connection:
    """Open the table in WAL mode.  ``synchronous=NORMAL`` survives a killed daemon (a
    commit is in the WAL before it returns); only a power loss can take the last commits.
    ``fsync``: ``FULL``, each commit on disk before it returns."""
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=check_same_thread)
        conn.execute("PRAGMA busy_timeout = 5000")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise TableError(f"{path}: cannot use WAL mode (journal_mode is {mode})")
        conn.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
    except sqlite3.Error as e:
        raise TableError(f"{path}: {e}") from None
    return conn


def migrate(conn: sqlite3.Connection, path: str) -> int:
    """Bring the schema up to VERSION, one migration per transaction; the version found."""
    try:
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found > VERSION:
            raise TableError(f"{path} has schema version {found}, newer than this daemon's "
                             f"{VERSION}: run a newer jobworker, or move the file away")
        for version in range(found, VERSION):
            conn.execute("BEGIN IMMEDIATE")
            for statement in _statements(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
    except sqlite3.Error as e:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise TableError(f"{path}: {e}") from None
    return int(found)


def _statements(script: str) -> list[str]:
    """A migration's statements, one by one (``executescript`` would commit first)."""
    parts, current = [], ""
    for line in script.splitlines():
        line = line.split("--", 1)[0]
        current += line + "\n"
        if sqlite3.complete_statement(current):
            parts.append(current.strip())
            current = ""
    return [p for p in parts if p]


_UPSERT = """
    INSERT INTO jobs (id, owner, state, pid, proc_start, proc_start_hi, started, ended,
                      request_id, request_digest, record, launch, name, labels)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (id) DO UPDATE SET
        state = excluded.state, pid = excluded.pid, proc_start = excluded.proc_start,
        proc_start_hi = excluded.proc_start_hi, started = excluded.started,
        ended = excluded.ended, record = excluded.record, launch = excluded.launch
"""


def write(conn: sqlite3.Connection, rows: Sequence[Row]) -> None:
    """Insert or update ``rows`` in one transaction."""
    conn.execute("BEGIN")
    try:
        conn.executemany(_UPSERT, rows)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite rolls back by itself on some errors (disk full)
            conn.execute("ROLLBACK")
        raise


def record_by_id(conn: sqlite3.Connection, job_id: str) -> bytes | None:
    row = conn.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return row[0] if row is not None else None


def record_by_pid(conn: sqlite3.Connection, pid: int) -> bytes | None:
    """The newest job that had ``pid``."""
    row = conn.execute("SELECT record FROM jobs WHERE pid = ? ORDER BY seq DESC LIMIT 1",
                       (pid,)).fetchone()
    return row[0] if row is not None else None


def ids_by_prefix(conn: sqlite3.Connection, prefix: str, owner: str | None,
                  limit: int) -> list[str]:
    """Up to ``limit`` ids that start with ``prefix`` (of ``owner``'s jobs, or anyone's):
    a range scan of the id index, as quick with a million jobs as with ten."""
    sql_text = "SELECT id FROM jobs WHERE id >= ? AND id < ?"
    args: list[Any] = [prefix, prefix + "\U0010ffff"]
    if owner is not None:
        sql_text += " AND owner = ?"
        args.append(owner)
    rows = conn.execute(sql_text + " ORDER BY id LIMIT ?", (*args, limit)).fetchall()
    return [row[0] for row in rows]


def by_request(conn: sqlite3.Connection, owner: str, request_id: str
               ) -> tuple[bytes, bytes] | None:
    """(record, request digest) of ``owner``'s start with this ``request_id``."""
    row = conn.execute("SELECT record, request_digest FROM jobs"
                       " WHERE owner = ? AND request_id = ?", (owner, request_id)).fetchone()
    return (row[0], row[1]) if row is not None else None


def page(
    conn: sqlite3.Connection,
    *,
    before: int | None,
    limit: int,
    owner: str | None = None,
    state: str | None = None,
    since: float | None = None,
    until: float | None = None,
    name: str | None = None,
    labels: Sequence[str] = (),
) -> list[tuple[int, str, str, bytes]]:
    """Up to ``limit`` jobs, newest first, older than cursor ``before``: (seq, id, state,
    record) each."""
    where: list[str] = []
    args: list[object] = []
    if before is not None:
        where.append("seq < ?")
        args.append(before)
    if owner is not None:
        where.append("owner = ?")
        args.append(owner)
    if state is not None:
        where.append("state = ?")
        args.append(state)
    if since is not None:
        where.append("started >= ?")
        args.append(since)
    if until is not None:
        where.append("started < ?")
        args.append(until)
    if name is not None:
        where.append("name = ?")
        args.append(name)
    for label in labels:  # whole labels: each is kept between line breaks
        where.append("instr(labels, ?) > 0")
        args.append(f"\n{label}\n")
    sql = "SELECT seq, id, state, record FROM jobs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY seq DESC LIMIT ?"
    args.append(limit)
    return conn.execute(sql, args).fetchall()


def record_by_name(conn: sqlite3.Connection, owner: str, name: str) -> bytes | None:
    """``owner``'s newest job named ``name``."""
    row = conn.execute("SELECT record FROM jobs WHERE owner = ? AND name = ?"
                       " ORDER BY seq DESC LIMIT 1", (owner, name)).fetchone()
    return row[0] if row is not None else None


def unfinished(conn: sqlite3.Connection) -> list[Unfinished]:
    """Every job recorded running, oldest first."""
    return [Unfinished(*row) for row in conn.execute(
        "SELECT seq, id, pid, proc_start, proc_start_hi, started, record FROM jobs"
        " WHERE state = 'running' ORDER BY seq")]


class Queued(NamedTuple):
    """A job the table says was queued: to put back in its queue at start-up."""

    seq: int
    id: str
    started: float
    record: bytes
    launch: bytes | None


def queued(conn: sqlite3.Connection) -> list[Queued]:
    """Every job recorded queued, oldest first."""
    return [Queued(*row) for row in conn.execute(
        "SELECT seq, id, started, record, launch FROM jobs WHERE state = 'queued'"
        " ORDER BY seq")]


def ended_before(conn: sqlite3.Connection, when: float, limit: int
                 ) -> list[tuple[str, bytes]]:
    """Up to ``limit`` ended jobs that ended before ``when``, oldest first: (id, record)."""
    return conn.execute("SELECT id, record FROM jobs WHERE ended < ? ORDER BY ended LIMIT ?",
                        (when, limit)).fetchall()


def ended_beyond(conn: sqlite3.Connection, keep: int, limit: int
                 ) -> list[tuple[str, bytes]]:
    """Up to ``limit`` of the oldest ended jobs past the newest ``keep``: (id, record)."""
    count = conn.execute("SELECT count(*) FROM jobs WHERE ended IS NOT NULL").fetchone()[0]
    excess = min(count - keep, limit)
    if excess <= 0:
        return []
    return conn.execute("SELECT id, record FROM jobs WHERE ended IS NOT NULL"
                        " ORDER BY seq LIMIT ?", (excess,)).fetchall()


def delete(conn: sqlite3.Connection, ids: Iterable[str]) -> None:
    conn.execute("BEGIN")
    try:
        conn.executemany("DELETE FROM jobs WHERE id = ? AND ended IS NOT NULL",
                         [(i,) for i in ids])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite rolls back by itself on some errors (disk full)
            conn.execute("ROLLBACK")
        raise
