"""jwclient's configuration file: named workers, the default, precedence of settings,
``workers``, ``list --all-workers`` and finding a job on another worker."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BIN, PKI, Daemon

from jobworker.client import Client, profiles

pytestmark = pytest.mark.timeout(90, method="thread")

WAIT = 20.0


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# -- the file and the precedence, as functions ------------------------------------------------


def test_settings_come_from_flag_then_variable_then_entry_then_default(tmp_path: Path) -> None:
    """Per setting: a flag wins over its variable, which wins over the worker's entry;
    the server falls back to 127.0.0.1:8443; relative paths are the file's folder's."""
    (tmp_path / "conf").mkdir()
    path = write(tmp_path / "conf" / "client.toml", """
default = "b1"
[worker.b1]
server = "b1.example:9000"
pki = "keys"
identity = "ci"
[worker.b2]
ca = "/abs/ca.pem"
""")
    loaded = profiles.load(path, required=True)
    assert loaded.default == "b1" and set(loaded.workers) == {"b1", "b2"}
    entry = loaded.workers["b1"]
    assert entry["pki"] == str(tmp_path / "conf" / "keys")
    assert profiles.settings({}, {}, entry)["server"] == "b1.example:9000"
    assert profiles.settings({}, {"JWCLIENT_SERVER": "env:1"}, entry)["server"] == "env:1"
    assert profiles.settings({"server": "flag:1"}, {"JWCLIENT_SERVER": "env:1"},
                             entry)["server"] == "flag:1"
    assert profiles.settings({}, {}, loaded.workers["b2"])["server"] == "127.0.0.1:8443"
    assert profiles.settings({"identity": "x"}, {"JWCLIENT_IDENTITY": "y"},
                             entry)["identity"] == "x"
    assert profiles.chosen(loaded, None, {}) == "b1"
    assert profiles.chosen(loaded, None, {"JWCLIENT_WORKER": "b2"}) == "b2"
    assert profiles.chosen(loaded, "b1", {"JWCLIENT_WORKER": "b2"}) == "b1"
    with pytest.raises(profiles.ProfileError, match="no worker 'b3'"):
        profiles.chosen(loaded, "b3", {})


def test_the_file_is_found_by_flag_variable_or_xdg(tmp_path: Path) -> None:
    """--config, then $JWCLIENT_CONFIG (both must exist), then
    $XDG_CONFIG_HOME/jobworker/client.toml (may be absent)."""
    env = {"XDG_CONFIG_HOME": str(tmp_path), "JWCLIENT_CONFIG": "/v.toml"}
    assert profiles.config_path("/f.toml", env) == ("/f.toml", True)
    assert profiles.config_path(None, env) == ("/v.toml", True)
    del env["JWCLIENT_CONFIG"]
    xdg = str(tmp_path / "jobworker" / "client.toml")
    assert profiles.config_path(None, env) == (xdg, False)
    assert profiles.load(xdg, required=False).workers == {}
    with pytest.raises(profiles.ProfileError, match="no configuration file"):
        profiles.load(xdg, required=True)


@pytest.mark.parametrize("text, needle", [
    ('default = "x"\n', "default names no worker"),
    ('[worker.a]\nport = 1\n', "unknown keys port"),
    ('servers = 1\n', "unknown keys servers"),
    ('[worker.a]\nserver = 1\n', "must be a string"),
    ('[worker\n', "not valid TOML"),
])
def test_a_bad_file_is_one_usage_error(tmp_path: Path, text: str, needle: str) -> None:
    """A malformed file: jwclient exits 2 with one line naming the file and the problem."""
    path = write(tmp_path / "c.toml", text)
    result = subprocess.run([str(BIN / "jwclient"), "--config", path, "whoami"],
                            capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr


# -- two real workers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def second(test_pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A second daemon for the module (as conftest's ``daemon`` is the first)."""
    d = Daemon(test_pki, tmp_path_factory.mktemp("second") / "state").start()
    yield d
    d.stop()


@pytest.fixture
def two(second: Daemon, daemon: Daemon, test_pki: PKI,
        tmp_path: Path) -> Iterator[tuple[Daemon, Daemon, str, int]]:
    """Workers a (the default) and b, plus c where nothing listens; the file's pki is a
    path relative to the file."""
    b = second
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        pki_dir = os.path.relpath(test_pki.dir, tmp_path)
        path = write(tmp_path / "client.toml", f"""
default = "a"
[worker.a]
server = "{daemon.address}"
pki = "{pki_dir}"
identity = "alice"
[worker.b]
server = "{b.address}"
pki = "{pki_dir}"
identity = "bob"
[worker.c]
server = "127.0.0.1:{port}"
pki = "{pki_dir}"
identity = "alice"
""")
        yield daemon, b, path, port


def jw(path: str, *args: str, env: dict[str, str] | None = None
       ) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JWCLIENT_")}
    return subprocess.run([str(BIN / "jwclient"), "--config", path, *args],
                          capture_output=True, text=True, timeout=WAIT,
                          env={**clean, **(env or {})}, cwd="/")


def test_workers_by_default_flag_and_variable(two: tuple[Daemon, Daemon, str, int]) -> None:
    """The default worker, then --worker, then $JWCLIENT_WORKER choose the daemon (each
    with its entry's identity); a flag still beats the entry."""
    _, _, path, _ = two
    assert jw(path, "whoami").stdout.split()[1] == "alice"
    assert jw(path, "--worker", "b", "whoami").stdout.split()[1] == "bob"
    assert jw(path, "whoami", env={"JWCLIENT_WORKER": "b"}).stdout.split()[1] == "bob"
    assert jw(path, "--worker", "b", "--identity", "admin", "whoami").stdout.split()[1] == \
        "admin"
    missing = jw(path, "--worker", "zz", "whoami")
    assert missing.returncode == 2 and "no worker 'zz'" in missing.stderr


def test_workers_shows_reachability_and_identity(two: tuple[Daemon, Daemon, str, int]) -> None:
    """One row per worker; the unreachable one says why; exit 1 since one is down."""
    a, b, path, port = two
    result = jw(path, "--json", "workers")
    assert result.returncode == 1
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert (rows["a"]["reachable"], rows["a"]["identity"], rows["a"]["default"]) == \
        (True, "alice", True)
    assert (rows["b"]["reachable"], rows["b"]["identity"]) == (True, "bob")
    assert rows["c"]["reachable"] is False and "cannot connect" in rows["c"]["error"]
    human = jw(path, "workers").stdout.splitlines()
    assert human[0].split() == ["WORKER", "SERVER", "REACHABLE", "IDENTITY"]
    assert human[1].startswith("a*") and "alice (user)" in human[1]


def test_list_all_workers_merges_with_a_worker_column(
        two: tuple[Daemon, Daemon, str, int]) -> None:
    """Jobs of a and b in one table, each marked with its worker; c's failure is a line
    on stderr and exit 1."""
    a, b, path, _ = two
    with Client(a.address, pki=str(a.pki.dir), identity="alice") as ca, \
            Client(b.address, pki=str(b.pki.dir), identity="bob") as cb:
        on_a, on_b = ca.start("true").id, cb.start("true").id
    result = jw(path, "--json", "list", "--all-workers")
    assert result.returncode == 1 and "c: cannot connect" in result.stderr
    where = {r["id"]: r["worker"] for r in json.loads(result.stdout)}
    assert where[on_a] == "a" and where[on_b] == "b"
    table = jw(path, "list", "--all-workers", "--wide").stdout.splitlines()
    assert table[0].split()[:2] == ["WORKER", "ID"]
    assert any(line.split()[:2] == ["b", on_b] for line in table)


def test_an_id_unknown_to_the_default_is_found_on_another_worker(
        two: tuple[Daemon, Daemon, str, int]) -> None:
    """status and wait of b's job, asked of the default a, answer from b; with
    --worker a the answer stays a's 'no job'."""
    _, b, path, _ = two
    with Client(b.address, pki=str(b.pki.dir), identity="bob") as cb:
        job = cb.start("sh", ["-c", "exit 4"]).id
        while job[:8].isdecimal():  # all digits is a pid (1 id in 43): another one
            job = cb.start("sh", ["-c", "exit 4"]).id
    assert jw(path, "--worker", "b", "wait", job).returncode == 4
    found = jw(path, "--json", "status", job[:8])
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["owner"] == "bob"
    assert jw(path, "wait", job).returncode == 4
    pinned = jw(path, "--worker", "a", "status", job)
    assert pinned.returncode == 1 and pinned.stderr == f"jwclient: no job {job}\n"
