"""``jwclient`` basics: whoami, options from the environment, and one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BIN, PKI, Daemon


def jwclient(*args: str, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real jwclient with no JWCLIENT_* variables but those given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JWCLIENT_")}
    return subprocess.run([str(BIN / "jwclient"), *args], capture_output=True, text=True,
                          timeout=60, env={**clean, **(env or {})}, cwd=cwd,
                          stdin=subprocess.DEVNULL)


def assert_one_line_error(result: subprocess.CompletedProcess[str], status: int,
                          *needles: str) -> str:
    """Exit ``status``, nothing on stdout, exactly one ``jwclient: ...`` line on stderr."""
    assert result.returncode == status, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jwclient: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port bound by us but not listening: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def creds(p: PKI, identity: str) -> list[str]:
    ca, cert, key = p.paths(identity)
    return ["--ca", ca, "--cert", cert, "--key", key]


# -- whoami ------------------------------------------------------------------------------------


def test_whoami_prints_identity_and_role(daemon: Daemon, test_pki: PKI) -> None:
    """Human output: two aligned lines, identity then role."""
    result = jwclient("--server", daemon.address, *creds(test_pki, "alice"), "whoami")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "identity: alice\nrole:     user\n"
    assert result.stderr == ""


def test_whoami_json(daemon: Daemon, test_pki: PKI) -> None:
    """--json prints one JSON object with identity and role."""
    result = jwclient("--server", daemon.address, *creds(test_pki, "auditor"), "--json",
                      "whoami")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"identity": "auditor", "role": "viewer"}


def test_whoami_without_a_role(daemon: Daemon, test_pki: PKI) -> None:
    """A certificate without an OU is still served whoami, with role shown as (none) / null."""
    human = jwclient("--server", daemon.address, *creds(test_pki, "norole"), "whoami")
    assert human.stdout == "identity: norole\nrole:     (none)\n"
    as_json = jwclient("--server", daemon.address, *creds(test_pki, "norole"), "--json",
                       "whoami")
    assert json.loads(as_json.stdout) == {"identity": "norole", "role": None}


# -- options from the environment --------------------------------------------------------------


def test_server_pki_and_identity_from_the_environment(daemon: Daemon, test_pki: PKI) -> None:
    """JWCLIENT_SERVER, JWCLIENT_PKI and JWCLIENT_IDENTITY stand in for the flags."""
    result = jwclient("whoami", env={"JWCLIENT_SERVER": daemon.address,
                                     "JWCLIENT_PKI": str(test_pki.dir),
                                     "JWCLIENT_IDENTITY": "bob"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["identity:", "bob"]


def test_ca_cert_and_key_from_the_environment(daemon: Daemon, test_pki: PKI) -> None:
    """JWCLIENT_CA, JWCLIENT_CERT and JWCLIENT_KEY name the files directly."""
    ca, cert, key = test_pki.paths("admin")
    result = jwclient("--json", "whoami", env={"JWCLIENT_SERVER": daemon.address,
                                               "JWCLIENT_CA": ca, "JWCLIENT_CERT": cert,
                                               "JWCLIENT_KEY": key})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"identity": "admin", "role": "admin",
                                         "audit_failures": 0}


def test_flags_win_over_the_environment(daemon: Daemon, test_pki: PKI,
                                        refusing_port: int) -> None:
    """A flag beats its variable: --identity and --server override JWCLIENT_*."""
    result = jwclient("--server", daemon.address, "--identity", "alice", "whoami",
                      env={"JWCLIENT_SERVER": f"127.0.0.1:{refusing_port}",
                           "JWCLIENT_PKI": str(test_pki.dir), "JWCLIENT_IDENTITY": "bob"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["identity:", "alice"]


def test_the_server_variable_is_used_when_no_flag_is_given(test_pki: PKI,
                                                           refusing_port: int) -> None:
    """JWCLIENT_SERVER is where jwclient connects (seen in the error naming it)."""
    result = jwclient("whoami", env={"JWCLIENT_SERVER": f"127.0.0.1:{refusing_port}",
                                     "JWCLIENT_PKI": str(test_pki.dir),
                                     "JWCLIENT_IDENTITY": "alice"})
    assert_one_line_error(result, 1, f"127.0.0.1:{refusing_port}")


# -- every error is one line -------------------------------------------------------------------


def test_server_down_is_connection_refused(test_pki: PKI, refusing_port: int) -> None:
    """Nothing listening: 'jwclient: cannot connect to HOST:PORT: Connection refused', exit 1."""
    result = jwclient("--server", f"127.0.0.1:{refusing_port}", *creds(test_pki, "alice"),
                      "whoami")
    assert_one_line_error(result, 1, "cannot connect", f"127.0.0.1:{refusing_port}",
                          "onnection refused")


def test_a_missing_certificate_file(daemon: Daemon, test_pki: PKI, tmp_path: Path) -> None:
    """A certificate path that does not exist: a usage error, one line naming it, exit 2."""
    ca, _, key = test_pki.paths("alice")
    missing = str(tmp_path / "nope.pem")
    result = jwclient("--server", daemon.address, "--ca", ca, "--cert", missing, "--key", key,
                      "whoami")
    assert_one_line_error(result, 2, missing)


def test_a_missing_key_and_a_bad_ca_file(daemon: Daemon, test_pki: PKI,
                                         tmp_path: Path) -> None:
    """A missing key (exit 2) and a CA file without a certificate (exit 1) are each one line
    naming the file."""
    ca, cert, _ = test_pki.paths("alice")
    missing_key = str(tmp_path / "nope.key")
    result = jwclient("--server", daemon.address, "--ca", ca, "--cert", cert, "--key",
                      missing_key, "whoami")
    assert_one_line_error(result, 2, missing_key)
    empty_ca = tmp_path / "empty-ca.pem"
    empty_ca.write_text("not a certificate\n")
    _, cert, key = test_pki.paths("alice")
    result = jwclient("--server", daemon.address, "--ca", str(empty_ca), "--cert", cert,
                      "--key", key, "whoami")
    assert_one_line_error(result, 1, str(empty_ca))


def test_an_unknown_identity_in_the_pki(daemon: Daemon, test_pki: PKI) -> None:
    """--identity naming no file in --pki is a usage error naming the missing file."""
    result = jwclient("--server", daemon.address, "--pki", str(test_pki.dir), "--identity",
                      "nobody", "whoami")
    assert_one_line_error(result, 2, "nobody.pem")


@pytest.mark.parametrize("args, needle", [
    (["whoami"], "required"),  # no credentials at all
    (["--pki", "/p", "whoami"], "--identity"),
    (["--pki", "/p", "--identity", "a"], "required"),  # no command
    (["--pki", "/p", "--identity", "a", "frobnicate"], "invalid choice"),
    (["--pki", "/p", "--identity", "a", "--bogus", "whoami"], "unrecognized"),
    (["--pki", "/p", "--identity", "a", "whoami", "extra"], "unrecognized"),
])
def test_usage_errors_exit_2_in_one_line(args: list[str], needle: str) -> None:
    """Usage mistakes are exit status 2 and one line on stderr, not a usage dump."""
    assert_one_line_error(jwclient(*args), 2, needle)


@pytest.mark.parametrize("server", ["127.0.0.1:notaport", "127.0.0.1:0", "[::1", "a:b:c:d",
                                    "a b:1", "a..b:1"])
def test_a_bad_server_address_is_one_line(test_pki: PKI, server: str) -> None:
    """A malformed --server is a usage error: one line naming it, exit 2."""
    result = jwclient("--server", server, *creds(test_pki, "alice"), "whoami")
    assert_one_line_error(result, 2, "bad server address")


def test_help_lists_commands_and_exits_0() -> None:
    """jwclient --help exits 0 and names the commands and the environment variables."""
    result = jwclient("--help")
    assert result.returncode == 0
    for word in ("whoami", "start", "JWCLIENT_SERVER", "JWCLIENT_PKI", "JWCLIENT_IDENTITY",
                 "JWCLIENT_CA", "JWCLIENT_CERT", "JWCLIENT_KEY"):
        assert word in result.stdout, word
