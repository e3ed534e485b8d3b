"""``twistd jobworker``: its options, and one clear line when it cannot start."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, PKI
from twisted.python import usage

from jobworker.daemon.tap import Options
from jobworker.wire import frames

# -- Options, parsed in-process (as twisted/runner/test/test_procmontap.py does) ---------------


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_defaults() -> None:
    """With only --pki, every other option has its documented default."""
    opts = parse("--pki", "/p")
    assert opts["listen"] == "tcp:8443:interface=127.0.0.1"
    assert opts["state-dir"] == "./jobworker-state"
    assert opts["max-frame"] == frames.DEFAULT_MAX_FRAME
    assert opts["max-connections"] == 1024
    assert (opts["handshake-timeout"], opts["idle-timeout"], opts["frame-timeout"]) == \
        (10.0, 300.0, 30.0)
    assert opts["grace"] == 5.0
    assert opts["policy"] is None and opts["crl"] == []


def test_pki_names_the_three_files() -> None:
    """--pki DIR means DIR/ca.pem, DIR/server.pem and DIR/server.key."""
    opts = parse("--pki", "/p")
    assert (opts["ca"], opts["cert"], opts["key"]) == (
        "/p/ca.pem", "/p/server.pem", "/p/server.key")


def test_explicit_files_win_over_pki() -> None:
    """--cert and --key given with --pki replace only those two files."""
    opts = parse("--pki", "/p", "--cert", "/o/c.pem", "--key", "/o/c.key")
    assert (opts["ca"], opts["cert"], opts["key"]) == ("/p/ca.pem", "/o/c.pem", "/o/c.key")


def test_numbers_are_parsed() -> None:
    """Numeric options are converted to int or float."""
    opts = parse("--pki", "/p", "--max-frame", "2048", "--max-connections", "3",
                 "--handshake-timeout", "1.5", "--idle-timeout", "2", "--frame-timeout", "0.5",
                 "--grace", "7")
    assert (opts["max-frame"], opts["max-connections"]) == (2048, 3)
    assert (opts["handshake-timeout"], opts["idle-timeout"], opts["frame-timeout"],
            opts["grace"]) == (1.5, 2.0, 0.5, 7.0)


def test_crl_may_be_repeated() -> None:
    """--crl collects every file it is given, in order."""
    assert parse("--pki", "/p", "--crl", "a.pem", "--crl", "b.pem")["crl"] == ["a.pem", "b.pem"]


@pytest.mark.parametrize("argv, message", [
    ((), "--ca, --cert, --key required"),
    (("--ca", "c", "--cert", "s"), "--key required"),
    (("--pki", "/p", "--max-frame", "1023"), "--max-frame"),
    (("--pki", "/p", "--max-frame", str(16 * 1024 * 1024 + 1)), "--max-frame"),
    (("--pki", "/p", "--max-connections", "0"), "--max-connections"),
    (("--pki", "/p", "--handshake-timeout", "0"), "--handshake-timeout"),
    (("--pki", "/p", "--idle-timeout", "-1"), "--idle-timeout"),
    (("--pki", "/p", "--frame-timeout", "0"), "--frame-timeout"),
    (("--pki", "/p", "--frame-timeout", "86401"), "--frame-timeout"),
    (("--pki", "/p", "--grace", "0"), "--grace"),
    (("--pki", "/p", "--listen", "ssl:8443"), "plain endpoint"),
    (("--pki", "/p", "--log-format", "xml"), "--log-format is text or json"),
    (("--pki", "/p", "--listen", "unix:/run/jw.sock"), "TCP only"),
    (("--pki", "/p", "--listen", "tcp:notaport"), "port must be a number"),
    (("--pki", "/p", "--listen", "tcp:port=65536"), "port must be a number"),
    (("--pki", "/p", "--listen", "tcp:interface=127.0.0.1"), "no port"),
    (("--pki", "/p", "--max-frame", "lots"), "--max-frame must be a whole number"),
    (("--pki", "/p", "--grace", "soon"), "--grace must be a number"),
    (("--pki", "/p", "--max-running", "0"), "--max-running"),
])
def test_bad_values_are_usage_errors(argv: tuple[str, ...], message: str) -> None:
    """Missing credentials and out-of-range values are refused by postOptions."""
    with pytest.raises(usage.UsageError, match=message):
        parse(*argv)


def test_listen_ports_that_parse_are_accepted() -> None:
    """Port 0, a port= field and tcp6's escaped interface pass the --listen check."""
    for listen in ("tcp:0:interface=127.0.0.1", "tcp:port=8443",
                   "tcp6:8443:interface=\\:\\:1"):
        assert parse("--pki", "/p", "--listen", listen)["listen"] == listen


@pytest.mark.parametrize("argv", [("--pki", "/p", "--max-frame", "lots"),
                                  ("--pki", "/p", "--idle-timeout", "soon")])
def test_non_numbers_are_usage_errors(argv: tuple[str, ...]) -> None:
    """A word where a number belongs is a usage error, not a crash."""
    with pytest.raises(usage.UsageError):
        parse(*argv)


# -- the real twistd ---------------------------------------------------------------------------


def twistd(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JWCLIENT_")}
    return subprocess.run([str(BIN / "twistd"), "--nodaemon", "--pidfile=", "jobworker", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL)


def start_args(p: PKI, tmp_path: Path, *extra: str) -> list[str]:
    return ["--pki", str(p.dir), "--state-dir", str(tmp_path / "state"),
            "--listen", "tcp:0:interface=127.0.0.1", *extra]


def twistd_daemonizing(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """twistd without --nodaemon, its pidfile and log in ``cwd``."""
    return subprocess.run([str(BIN / "twistd"), f"--pidfile={cwd / 'jw.pid'}",
                           f"--logfile={cwd / 'jw.log'}", "jobworker", *args],
                          capture_output=True, text=True, timeout=30, cwd=cwd,
                          stdin=subprocess.DEVNULL)


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("twistd jobworker: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_help_lists_every_option(tmp_path: Path) -> None:
    """``twistd jobworker --help`` exits 0 and documents every option."""
    result = twistd("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    from jobworker.daemon.tap import Options

    parameters = [row[0] for row in Options.optParameters]
    flags = [row[0] for row in Options.optFlags]
    assert {"listen", "pki", "state-dir", "policy", "metrics", "log-format"} <= set(parameters)
    for name in parameters:
        assert f"--{name}=" in result.stdout, name
    for name in flags:
        assert f"--{name}" in result.stdout, name


def test_twistd_lists_the_jobworker_plugin(tmp_path: Path) -> None:
    """``twistd --help`` names jobworker among its commands, with its description."""
    result = subprocess.run([str(BIN / "twistd"), "--help"], capture_output=True, text=True,
                            timeout=30, cwd=tmp_path)
    assert result.returncode == 0
    assert "jobworker" in result.stdout and "TLS 1.3" in result.stdout


def test_missing_ca_file(test_pki: PKI, tmp_path: Path) -> None:
    """A CA file that does not exist: one line naming it, exit non-zero, no traceback."""
    missing = str(tmp_path / "no-such-ca.pem")
    result = twistd(*start_args(test_pki, tmp_path, "--ca", missing), cwd=tmp_path)
    assert_one_line_failure(result, missing, "No such file")


def test_missing_key_file(test_pki: PKI, tmp_path: Path) -> None:
    """A key file that does not exist: one line naming it."""
    missing = str(tmp_path / "no-such.key")
    result = twistd(*start_args(test_pki, tmp_path, "--key", missing), cwd=tmp_path)
    assert_one_line_failure(result, missing, "No such file")


def test_unreadable_key(test_pki: PKI, tmp_path: Path) -> None:
    """A key path that cannot be read (a directory: root reads any mode bits) is one line."""
    unreadable = tmp_path / "key-dir"
    unreadable.mkdir()
    result = twistd(*start_args(test_pki, tmp_path, "--key", str(unreadable)), cwd=tmp_path)
    assert_one_line_failure(result, str(unreadable), "cannot read private key")


def test_key_that_is_not_a_key(test_pki: PKI, tmp_path: Path) -> None:
    """A file that holds no private key (here a certificate) is one line."""
    result = twistd(*start_args(test_pki, tmp_path, "--key", test_pki.ca), cwd=tmp_path)
    assert_one_line_failure(result, test_pki.ca, "not an unencrypted PEM key")


def test_key_that_does_not_match_the_certificate(test_pki: PKI, tmp_path: Path) -> None:
    """A valid key of another certificate: one line saying they do not match."""
    _, _, alice_key = test_pki.paths("alice")
    result = twistd(*start_args(test_pki, tmp_path, "--key", alice_key), cwd=tmp_path)
    assert_one_line_failure(result, alice_key, "does not match")


def test_server_certificate_without_server_auth(test_pki: PKI, tmp_path: Path) -> None:
    """A certificate clients would refuse (clientAuth only) stops the daemon at start."""
    _, cert, key = test_pki.paths("alice")
    result = twistd(*start_args(test_pki, tmp_path, "--cert", cert, "--key", key), cwd=tmp_path)
    assert_one_line_failure(result, "serverAuth")


@pytest.mark.parametrize("daemonize", [False, True], ids=["nodaemon", "daemonize"])
def test_port_in_use(test_pki: PKI, tmp_path: Path, daemonize: bool) -> None:
    """Another listener on the port: one line naming --listen, exit status 1, with -n and
    daemonizing alike (the port is bound in makeService, before twistd forks), and no
    pidfile or log left behind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ("--pki", str(test_pki.dir), "--state-dir", str(tmp_path / "state"),
                "--listen", f"tcp:{port}:interface=127.0.0.1")
        result = (twistd_daemonizing if daemonize else twistd)(*args, cwd=tmp_path)
    line = assert_one_line_failure(result, f"--listen tcp:{port}", "cannot listen",
                                   "Address already in use")
    assert line == (f"twistd jobworker: --listen tcp:{port}:interface=127.0.0.1: cannot "
                    f"listen on 127.0.0.1:{port}: Address already in use")
    assert result.stdout == ""
    assert not (tmp_path / "jw.pid").exists() and not (tmp_path / "jw.log").exists()


@pytest.mark.parametrize("args, needles, daemonize", [
    pytest.param((), ("--ca, --cert, --key required (or --pki DIR)",), False, id="no-pki"),
    pytest.param(("--max-frame", "lots"), ("--max-frame must be a whole number, not 'lots'",),
                 False, id="not-a-number"),
    pytest.param(("--max-frame", "lots"), ("--max-frame must be a whole number, not 'lots'",),
                 True, id="not-a-number-daemonizing"),
    pytest.param(("--frame-timeout", "0"), ("--frame-timeout must be between",), False,
                 id="out-of-range"),
    pytest.param(("--no-such-option",), ("--no-such-option",), False, id="unknown-option"),
    pytest.param(("--listen", "tcp:notaport"),
                 ("--listen tcp:notaport: the port must be a number",), False, id="notaport"),
    pytest.param(("--listen", "unix:/tmp/jw.sock"), ("--listen unix:/tmp/jw.sock", "TCP only"),
                 False, id="unix"),
    pytest.param(("--listen", "nosuch:1"), ("--listen nosuch:1", "Unknown endpoint type"),
                 False, id="unknown-endpoint"),
])
def test_bad_options_are_one_line(test_pki: PKI, tmp_path: Path, args: tuple[str, ...],
                                  needles: tuple[str, ...], daemonize: bool) -> None:
    """A bad jobworker option is one line naming it and exit status 1, with -n and
    daemonizing alike: no usage dump, no repr, no second copy."""
    if args:
        args = ("--pki", str(test_pki.dir), "--state-dir", str(tmp_path / "state"), *args)
    result = (twistd_daemonizing if daemonize else twistd)(*args, cwd=tmp_path)
    assert_one_line_failure(result, *needles)
    assert "Usage:" not in result.stdout + result.stderr
    assert not (tmp_path / "jw.pid").exists()


def test_metrics_port_in_use(test_pki: PKI, tmp_path: Path) -> None:
    """A --metrics port taken by another listener stops start-up with one line naming
    --metrics, as --listen's does."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = twistd(*start_args(test_pki, tmp_path, "--metrics",
                                    f"tcp:{port}:interface=127.0.0.1"), cwd=tmp_path)
    assert_one_line_failure(result, "--metrics", str(port), "in use")



def test_missing_policy_is_one_line(test_pki: PKI, tmp_path: Path) -> None:
    """A --policy file that does not exist is one line naming --policy and the file."""
    missing = str(tmp_path / "no-policy.toml")
    result = twistd(*start_args(test_pki, tmp_path, "--policy", missing), cwd=tmp_path)
    assert_one_line_failure(result, "--policy", missing, "No such file")


def test_twistd_options_stay_twistds(tmp_path: Path) -> None:
    """A bad option of twistd itself is reported by twistd, as twistd reports it."""
    result = subprocess.run([str(BIN / "twistd"), "--no-such-twistd-option", "jobworker"],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 1
    assert "twistd jobworker:" not in result.stdout + result.stderr
    assert "--no-such-twistd-option" in result.stdout + result.stderr


def test_the_documented_connection_limits_are_the_defaults() -> None:
    """docs/protocol.md states each connection limit's default: the one in Limits, which
    the options and the connection protocol both use."""
    from jobworker.daemon.limits import DEFAULTS

    text = " ".join((Path(__file__).parents[1] / "docs" / "protocol.md").read_text().split())
    for phrase in (
        f"`--max-frame` bytes (default {DEFAULTS.max_frame:,})",
        f"`--handshake-timeout` ({DEFAULTS.handshake_timeout:g} s)",
        f"`--idle-timeout` ({DEFAULTS.idle_timeout:g} s)",
        f"not complete within {DEFAULTS.frame_timeout:g} s",
        f"`--max-connections` ({DEFAULTS.max_connections:,})",
        f"At most {DEFAULTS.max_in_flight} requests may be in flight",
        f"`--max-handshakes` ({DEFAULTS.max_handshakes:,})",
        f"`--max-streams-per-connection` ({DEFAULTS.max_streams_per_connection})",
        f"`--max-streams-per-identity` ({DEFAULTS.max_streams_per_identity})",
    ):
        assert phrase in text
    options = Options()
    options.parseOptions(["--pki", "unused"])
    assert (options["max-frame"], options["max-connections"], options["handshake-timeout"],
            options["idle-timeout"], options["frame-timeout"]) == (
        DEFAULTS.max_frame, DEFAULTS.max_connections, DEFAULTS.handshake_timeout,
        DEFAULTS.idle_timeout, DEFAULTS.frame_timeout)
