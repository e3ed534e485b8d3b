"""Request parameters fuzzed against a real daemon over real TLS: for every method, maps of
right and wrong types, huge values, missing and extra keys.  Each reply is a result or a
typed error with a known code, never ``internal``, and the connection stays open (but
after a hello naming another version, which the protocol closes)."""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

from conftest import Daemon, quick_and_soak
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_robustness import Conn

from jobworker import PROTOCOL_VERSION
from jobworker.wire.errors import BadRequest
from jobworker.wire.params import SCHEMAS
from jobworker.wire.record import STATES

#: What a request whose parameters passed the schema may still meet: no such job (or not
#: the caller's), a role that may not call the method, a daemon short of disk.
AFTER_THE_SCHEMA = {"not_found", "forbidden", "unavailable"}
MAX_FRAME = 1 << 20  # the daemon's --max-frame: room for values past every schema limit

# -- values --------------------------------------------------------------------------------

huge_ints = st.sampled_from([-(2**63), -1, 0, 1, 2**31, 2**31 + 1, 2**53, 2**63 - 1, 2**63,
                             2**64 - 1])
ints = st.one_of(st.integers(-(2**63), 2**64 - 1), huge_ints)
floats = st.one_of(st.floats(), st.sampled_from([-0.0, 5e-324, 0.001, 3600.0, 3600.5, 1e8,
                                                 1e8 + 1, 1e308, float("inf"),
                                                 float("nan")]))
long_texts = st.sampled_from(["", "\0", "a\0b", "x" * 4097, "é" * 4097, "x" * 65537])
texts = st.one_of(st.text(max_size=16), long_texts)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts, st.binary(max_size=16))
anything = st.one_of(scalars, st.lists(scalars, max_size=4),
                     st.dictionaries(st.text(max_size=4), scalars, max_size=3))


def but(*kinds: type) -> st.SearchStrategy[Any]:
    """Any value except those of ``kinds``: a wrong type (``bool`` counts apart from int)."""
    return anything.filter(lambda v: type(v) not in kinds)


#: The only programs a start may name: harmless ones, and ones that do not exist.  The
#: working directory and PATH are chosen from fixed lists too, so that no other program
#: can be found.
PROGRAMS = st.sampled_from(["true", "/bin/true", "/bin/echo", "echo", "jw-no-such-program",
                            "/nonexistent/program", "./true", ".", "/", "x" * 4097])
DIRS = st.sampled_from(["/", "/bin", "/nonexistent", "relative", "", "/bin/true", "\0",
                        "x" * 4097])
ENV = st.one_of(
    st.builds("JW_FUZZ={}".format, texts),
    st.sampled_from(["PATH=/usr/bin:/bin", "PATH=", "PATH=/nonexistent", "HOME=/", "=", "=x",
                     "", "X=\0", "X" * 70_000]),
    st.text(max_size=12).filter(lambda s: "=" not in s),  # not KEY=VALUE: the job fails
)


def no_path_or_preload(entries: list[Any]) -> bool:
    """Whether no entry sets PATH or the dynamic loader (which could find other programs)."""
    return not any(isinstance(e, str) and e.startswith(("PATH=", "LD_")) for e in entries)


def job_refs(known: list[str | int]) -> st.SearchStrategy[Any]:
    """Jobs that exist (ids and pids), and refs that do not or cannot."""
    return st.one_of(st.sampled_from(known), st.integers(-5, 2**31 + 5), huge_ints, texts,
                     but(str, int))


def fields(known: list[str | int]) -> dict[str, dict[str, tuple[Any, Any]]]:
    """For each method, each parameter: (values of the right type and range, values of any
    kind); names are checked against the schemas by the test."""
    job = (st.sampled_from(known), job_refs(known))
    return {
        "hello": {"version": (st.just(PROTOCOL_VERSION),
                              st.one_of(st.integers(0, 3), ints, but(int))),
                  "client": (st.text(max_size=128), st.one_of(texts, but(str)))},
        "whoami": {},
        "start": {
            "command": (st.sampled_from(["true", "/bin/echo"]), st.one_of(PROGRAMS, but(str))),
            "args": (st.lists(st.text(max_size=16), max_size=4),
                     st.one_of(st.lists(texts, max_size=4), st.just([""] * 4097),
                               st.lists(anything, max_size=3), but(list))),
            "env": (st.lists(st.builds("JW_FUZZ={}".format, st.text(max_size=16)), max_size=3),
                    st.one_of(st.lists(ENV, max_size=4),
                              st.lists(anything, max_size=3).filter(no_path_or_preload),
                              but(list))),
            "dir": (st.sampled_from(["/", "/bin"]), st.one_of(DIRS, but(str))),
            "timeout": (st.one_of(st.floats(0.001, 10.0), st.sampled_from([0.001, 1, 10.0])),
                        st.one_of(floats, ints, but(int, float))),
            # Drawn again with other parameters, a request_id is a bad_request after the
            # schema (see check_reply).
            "request_id": (st.text(min_size=1, max_size=8),
                           st.one_of(st.just(""), st.text(min_size=129, max_size=140),
                                     but(str))),
            # alice's jobs run as root by the test policy: "root" is hers to ask for,
            # "nobody" is not (forbidden), an unknown user is a bad_request.
            "user": (st.sampled_from(["root", "nobody", "jw-no-such-user"]),
                     st.one_of(st.just(""), texts, but(str))),
            # Limits (cgroups): modest values, and any.
            "memory": (st.sampled_from([64 << 20, 1 << 30]), st.one_of(ints, but(int))),
            "cpu": (st.sampled_from([0.5, 1.0, 2]), st.one_of(floats, ints, but(int, float))),
            "pids": (st.sampled_from([16, 64]), st.one_of(ints, but(int))),
            "io_read": (st.sampled_from([1 << 20, 100 << 20]), st.one_of(ints, but(int))),
            "io_write": (st.sampled_from([1 << 20, 100 << 20]), st.one_of(ints, but(int))),
            # An unknown queue is a bad_request after the schema; a priority above 0 is
            # forbidden (alice's max_priority is the default, 0).
            "queue": (st.just("default"), st.one_of(st.just(""), st.just("nope"), texts,
                                                    but(str))),
            "priority": (st.sampled_from([-5, 0]), st.one_of(ints, but(int))),
            "after": (st.lists(st.sampled_from(known), max_size=2),
                      st.one_of(st.lists(job_refs(known), max_size=3), but(list))),
            # A name drawn twice while its job still runs is a bad_request after the schema.
            "name": (st.sampled_from(["fuzz-a", "fuzz-b"]), st.one_of(texts, st.just("123"),
                                                                      but(str))),
            "labels": (st.lists(st.sampled_from(["k=v", "team=x", "a.b/c=", "k=v v"]),
                                max_size=3),
                       st.one_of(st.lists(st.one_of(texts, st.just("=v"), st.just("k=\n")),
                                          max_size=3), but(list))),
            "isolate": (st.sampled_from([[], ["mount"], ["net"]]),
                        st.one_of(st.lists(st.sampled_from(["pid", "pid", "x", ""]),
                                           max_size=3), st.lists(anything, max_size=2),
                                  but(list))),
        },
        "start_many": {"jobs": (
            st.lists(st.fixed_dictionaries({"command": st.sampled_from(["true", "/bin/echo"])},
                                            optional={"args": st.lists(st.text(max_size=8),
                                                                       max_size=2)}),
                     max_size=3),
            st.one_of(st.lists(anything, max_size=3), st.just([{}] * 257), but(list)))},
        "stop": {"job": job,
                 "grace": (st.one_of(st.floats(0.0, 3600.0), st.sampled_from([0, 3600])),
                           st.one_of(floats, ints, but(int, float)))},
        "status": {"job": job},
        "wait": {"job": job},
        "list": {
            "running": (st.booleans(), anything),
            "limit": (st.integers(1, 2**31), st.one_of(ints, but(int))),
            "cursor": (st.sampled_from(["1", "3", "999999", "x1"]), st.one_of(texts, but(str))),
            "state": (st.sampled_from(STATES), st.one_of(texts, anything)),
            "owner": (st.sampled_from(["alice", "bob"]), st.one_of(st.just(""), but(str))),
            "since": (st.floats(0.0, 1e11), st.one_of(floats, ints, but(int, float))),
            "until": (st.floats(0.0, 1e11), st.one_of(floats, ints, but(int, float))),
            "name": (st.sampled_from(["fuzz-a", "x"]), st.one_of(texts, but(str))),
            "labels": (st.lists(st.sampled_from(["k=v", "team=x"]), max_size=2),
                       st.one_of(st.lists(texts, max_size=2), but(list))),
        },
        "forget": {"job": job},
        "queues": {},
        "logs": {
            "job": job,
            "stream": (st.sampled_from(["stdout", "stderr"]), st.one_of(texts, anything)),
            "offset": (st.one_of(st.integers(0, 2**63 - 1), st.sampled_from([2**32, 2**62,
                                                                             2**63 - 1])),
                       st.one_of(ints, but(int))),
            "follow": (st.booleans(), anything),
        },
    }


def requests(method: str, spec: dict[str, tuple[Any, Any]]) -> st.SearchStrategy[Any]:
    """Parameter maps for ``method``: all right (required keys present), or each key
    present or missing with any value, plus keys the method does not have."""
    required = SCHEMAS[method].required
    right = st.fixed_dictionaries(
        {name: good for name, (good, _) in spec.items() if name in required},
        optional={name: good for name, (good, _) in spec.items() if name not in required})
    mixed = st.fixed_dictionaries(
        {}, optional={name: st.one_of(good, bad) for name, (good, bad) in spec.items()})
    extra = st.dictionaries(st.text(max_size=8).filter(lambda k: k not in spec), anything,
                            max_size=2)
    wrong = st.builds(lambda p, x: {**p, **x}, mixed, extra)
    return st.one_of(right, wrong)


# -- one connection per identity, kept open ------------------------------------------------


class Session:
    """Fuzzing connections to ``daemon``, one per identity, opened again only after a hello
    that named another version."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.conns: dict[str, Conn] = {}
        self.next_id = 1
        self.seen: Counter[str] = Counter()

    def conn(self, identity: str) -> Conn:
        if identity not in self.conns:
            conn = Conn(self.daemon, identity, timeout=10)
            conn.hello()
            self.conns[identity] = conn
        return self.conns[identity]

    def call(self, identity: str, method: str, params: dict[str, Any]) -> Any:
        """Send one request; return its final frame (chunks before it are checked to be
        this request's).  A frame the daemon cannot decode (an array over 4,096 items) is
        answered with a null id, as the protocol says: its id could not be read."""
        conn = self.conn(identity)
        rid, self.next_id = self.next_id, self.next_id + 1
        conn.send({"id": rid, "method": method, "params": params})
        while True:
            reply = conn.read()  # EOFError if the daemon closes
            if reply.get("id") is None and reply.get("error", {}).get("code") == "bad_request":
                return reply
            assert reply.get("id") == rid, reply
            if set(reply) != {"id", "chunk"}:
                assert set(reply) in ({"id", "result"}, {"id", "error"}), reply
                return reply

    def closed(self, identity: str) -> bool:
        """Whether the daemon closes ``identity``'s connection (then forgotten)."""
        conn = self.conns.pop(identity)
        try:
            return conn.closed_within(5)
        finally:
            conn.close()

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


def check_reply(session: Session, identity: str, method: str, params: dict[str, Any],
                reply: dict[str, Any]) -> str:
    """Check one reply against what the schema says of ``params``; return its outcome."""
    try:
        SCHEMAS[method].validate(params)
        valid = True
    except BadRequest:
        valid = False
    error = reply.get("error")
    if error is not None:
        code = error["code"]
        assert isinstance(error.get("message"), str) and error["message"], reply
        if not valid:
            assert code == "bad_request", (method, params, reply)
        elif method == "hello":  # another version: refused, and the connection closed
            assert code == "unsupported_version", (params, reply)
            assert params["version"] != PROTOCOL_VERSION
            assert session.closed(identity), "hello with another version left it open"
        elif code == "bad_request":
            # Refused after the schema: a request_id already used for another start, a
            # start as a user the host does not have, a list cursor that is no cursor, a
            # forget of a running job.
            assert (method == "start" and any(k in params for k in (
                "request_id", "user", "isolate", "memory", "cpu", "pids", "queue", "name"))) or (
                method == "list" and "cursor" in params) or method == "forget", (
                method, params, reply)
        else:
            assert code in AFTER_THE_SCHEMA, (method, params, reply)
        return code
    assert valid, f"{method} {params!r} passed, but the schema refuses it: {reply}"
    result = reply["result"]
    if method == "start":
        assert result["state"] in STATES and (result["state"] != "failed" or result["error"])
        assert identity != "auditor", "a viewer started a job"
    elif method == "forget":
        assert isinstance(result["job"], str)
    elif method in ("stop", "status", "wait"):
        assert result["state"] in STATES, result
    elif method == "logs":
        assert type(result["offset"]) is int and result["record"]["state"] in STATES
    elif method == "start_many":
        assert all(r["state"] in STATES if "state" in r
                   else r["error"]["code"] in AFTER_THE_SCHEMA | {"bad_request"}
                   for r in result["jobs"]), result
        assert identity != "auditor" or not result["jobs"], "a viewer started a job"
    elif method == "queues":
        assert {q["queue"] for q in result["queues"]} >= {"default"}, result
    return "result"


# -- the test ------------------------------------------------------------------------------


def fuzz(session: Session, method: str, spec: dict[str, tuple[Any, Any]],
         examples: int) -> None:
    """``examples`` requests of ``method``, as alice (a user) or auditor (a viewer)."""
    @settings(max_examples=examples, deadline=timedelta(seconds=5), database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                     HealthCheck.data_too_large])
    @given(identity=st.sampled_from(["alice", "auditor"]), params=requests(method, spec))
    def one(identity: str, params: dict[str, Any]) -> None:
        reply = session.call(identity, method, params)
        session.seen[f"{method} {check_reply(session, identity, method, params, reply)}"] += 1

    one()


def ended_jobs(daemon: Daemon) -> list[str | int]:
    """A few ended jobs to refer to, by id and by pid: alice's, and one of bob's (which
    alice may not see)."""
    known: list[str | int] = []
    for who, argv in (("alice", ["true"]), ("alice", ["sh", "-c", "echo out; echo err >&2"]),
                      ("bob", ["true"])):
        conn = Conn(daemon, who)
        conn.hello()
        job = conn.call("start", {"command": argv[0], "args": argv[1:]})
        ended = conn.call("wait", {"job": job["id"]})
        conn.close()
        known += [ended["id"], ended["pid"]]
    return known


@quick_and_soak(quick=550, soak=8000, soak_timeout=3600)
def test_fuzzed_parameters_get_a_result_or_a_typed_error(make_daemon: Any, tmp_path: Path,
                                                         scale: int) -> None:
    """550 requests with fuzzed parameters (50 per method, as a user and as a viewer) on
    two real connections: each is answered with a result the schema allows or a typed
    error with a known code (bad_request exactly when the schema refuses the parameters),
    never internal and never a close but after a hello of another version (then opened
    again); afterwards
    the connections and a new one still answer whoami, and the log has no traceback."""
    d = make_daemon("--max-frame", str(MAX_FRAME))
    known = ended_jobs(d)
    table = fields(known)
    assert {m: set(spec) for m, spec in table.items()} == {
        m: set(s.required) | set(s.optional) for m, s in SCHEMAS.items()}, \
        "a method or parameter is not fuzzed"
    session = Session(d)
    began = time.monotonic()
    try:
        for method, spec in table.items():
            fuzz(session, method, spec, scale // len(table))
        # Whatever the fuzzer drew: a hello of another version is refused and closes.
        other = {"version": PROTOCOL_VERSION + 1}
        outcome = check_reply(session, "alice", "hello", other,
                              session.call("alice", "hello", other))
        session.seen[f"hello {outcome}"] += 1
        for identity in ("alice", "auditor"):
            assert session.conn(identity).call("whoami")["identity"] == identity
    finally:
        session.close()
    elapsed = time.monotonic() - began
    conn = Conn(d, "bob")
    conn.hello()
    assert conn.call("whoami")["identity"] == "bob"
    conn.close()
    print(f"{sum(session.seen.values())} fuzzed requests in {elapsed:.1f}s: "
          f"{dict(sorted(session.seen.items()))}")
    for method in SCHEMAS:  # the fuzzer reached both sides of every schema
        assert session.seen[f"{method} result"] and session.seen[f"{method} bad_request"], \
            (method, session.seen)
    assert "request.bug" not in d.log() and d.tracebacks() == []
