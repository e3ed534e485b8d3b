"""Tests for jobworker-certs and the certificate builders in jobworker.pki."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker import pki

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SCRIPT = ROOT / "certs" / "openssl-example.sh"
README = ROOT / "certs" / "README.md"

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl binary is not installed")

# Spelt in two parts so that no line of this file looks like a committed private key.
KEY_PEM_HEADER = b"-----BEGIN " + b"PRIVATE KEY-----"


def run_certs(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the real console entry point, as an operator would."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "jobworker.pki", *map(str, args)],
        cwd=cwd,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def openssl_verify(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, "verify", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def assert_one_error_line(stderr: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("jobworker-certs: ")


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A PKI made by the CLI: init with two extra hosts, then client alice as admin."""
    base = tmp_path_factory.mktemp("pki")
    hosts = ["--host", "jobs.example.com", "--host", "192.0.2.10"]
    done = run_certs("init", "dev", *hosts, cwd=base)
    assert done.returncode == 0, done.stderr
    done = run_certs("client", "dev", "alice", "--role", "admin", cwd=base)
    assert done.returncode == 0, done.stderr
    yield base / "dev"


# -- the command line ------------------------------------------------------------------------


def test_init_writes_files_with_private_modes(pki_dir: Path) -> None:
    """init creates DIR as 0700 with 0600 keys and 0644 certificates."""
    assert mode(pki_dir) == 0o700
    for name in ("ca.key", "server.key"):
        assert mode(pki_dir / name) == 0o600, name
        assert (pki_dir / name).read_bytes().startswith(KEY_PEM_HEADER)
    for name in ("ca.pem", "server.pem"):
        assert mode(pki_dir / name) == 0o644, name


def test_client_writes_files_with_private_modes(pki_dir: Path) -> None:
    """client writes NAME.key as unencrypted PKCS#8 mode 0600 and NAME.pem mode 0644."""
    assert mode(pki_dir / "alice.key") == 0o600
    assert (pki_dir / "alice.key").read_bytes().startswith(KEY_PEM_HEADER)
    assert mode(pki_dir / "alice.pem") == 0o644


@needs_openssl
def test_openssl_accepts_server_cert(pki_dir: Path) -> None:
    """openssl verifies server.pem for the sslserver purpose, by IP and by host name."""
    done = openssl_verify(
        "-CAfile", pki_dir / "ca.pem", "-purpose", "sslserver", pki_dir / "server.pem"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for check in (
        ["-verify_ip", "::1"],
        ["-verify_ip", "192.0.2.10"],
        ["-verify_hostname", "jobs.example.com"],
    ):
        done = openssl_verify("-CAfile", pki_dir / "ca.pem", *check, pki_dir / "server.pem")
        assert done.returncode == 0, (check, done.stdout + done.stderr)


@needs_openssl
def test_openssl_accepts_client_cert(pki_dir: Path) -> None:
    """openssl verifies NAME.pem for the sslclient purpose."""
    done = openssl_verify(
        "-CAfile", pki_dir / "ca.pem", "-purpose", "sslclient", pki_dir / "alice.pem"
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_server_cert_names_local_and_extra_hosts(pki_dir: Path) -> None:
    """The server SANs hold localhost, 127.0.0.1, ::1 and each --host, IPs as IPAddress."""
    cert = load_cert(pki_dir / "server.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "jobs.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("192.0.2.10"),
    ]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "jobs.example.com"


def test_server_and_ca_extensions(pki_dir: Path) -> None:
    """The CA is a critical CA:TRUE signer; the server a critical CA:FALSE serverAuth leaf."""
    ca = load_cert(pki_dir / "ca.pem")
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert ca.subject.rfc4514_string() == "CN=jobworker CA"

    server = load_cert(pki_dir / "server.pem")
    constraints = server.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = server.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_client_cert_subject_and_extensions(pki_dir: Path) -> None:
    """The client cert has CN=NAME, OU=role, clientAuth EKU and critical CA:FALSE."""
    cert = load_cert(pki_dir / "alice.pem")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert [attr.value for attr in ou] == ["admin"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    assert cert.issuer == load_cert(pki_dir / "ca.pem").subject


def test_init_refuses_to_replace_a_ca(tmp_path: Path) -> None:
    """A second init fails with one error line and leaves ca.key alone; --force replaces it."""
    assert run_certs("init", "pki", cwd=tmp_path).returncode == 0
    before = (tmp_path / "pki" / "ca.key").read_bytes()

    done = run_certs("init", "pki", cwd=tmp_path)
    assert done.returncode == 1
    assert_one_error_line(done.stderr)
    assert "--force" in done.stderr
    assert (tmp_path / "pki" / "ca.key").read_bytes() == before

    done = run_certs("init", "pki", "--force", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "pki" / "ca.key").read_bytes() != before
    assert mode(tmp_path / "pki" / "ca.key") == 0o600


def test_bad_client_name_is_a_usage_error(tmp_path: Path) -> None:
    """A client NAME that is unsafe as a file name exits 2 and writes nothing."""
    assert run_certs("init", "pki", cwd=tmp_path).returncode == 0
    done = run_certs("client", "pki", "../evil", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "evil.pem").exists()
    assert sorted(p.name for p in (tmp_path / "pki").iterdir()) == [
        "ca.key",
        "ca.pem",
        "server.key",
        "server.pem",
    ]


@pytest.mark.parametrize(
    "name", ["", ".hidden", "-rf", "a/b", "a" * 65, "alice\n", "ca", "Server", "al ice", "é"]
)
def test_client_name_rules(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Names that are not safe file names, or would clobber ca/server files, are refused."""
    assert not pki.valid_client_name(name)
    assert pki.main(["client", "unused-dir", name]) == 2
    assert "jobworker-certs client: error:" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["a", "alice", "Bob-2", "svc.deploy_01", "x" * 64])
def test_client_name_accepted(name: str) -> None:
    """Names of 1 to 64 safe characters starting with a letter or digit are accepted."""
    assert pki.valid_client_name(name)


def test_client_without_ca_fails_cleanly(tmp_path: Path) -> None:
    """client on a directory with no CA exits 1 with one jobworker-certs line, no traceback."""
    (tmp_path / "empty").mkdir()
    done = run_certs("client", "empty", "alice", cwd=tmp_path)
    assert done.returncode == 1
    assert_one_error_line(done.stderr)
    assert list((tmp_path / "empty").iterdir()) == []


def test_init_on_a_file_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """init where DIR is an existing file exits 1 with one error line."""
    (tmp_path / "file").write_text("")
    assert pki.main(["init", str(tmp_path / "file")]) == 1
    assert_one_error_line(capsys.readouterr().err)


def test_client_no_role_and_days(tmp_path: Path) -> None:
    """--no-role omits the OU; --days sets the lifetime."""
    assert pki.main(["init", str(tmp_path)]) == 0
    assert pki.main(["client", str(tmp_path), "nobody", "--no-role", "--days", "2"]) == 0
    cert = load_cert(tmp_path / "nobody.pem")
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME) == []
    lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(days=1) < lifetime <= datetime.timedelta(days=2)


def test_role_and_no_role_conflict(capsys: pytest.CaptureFixture[str]) -> None:
    """--role and --no-role together, or an unknown role, are usage errors."""
    assert pki.main(["client", "d", "alice", "--role", "admin", "--no-role"]) == 2
    assert pki.main(["client", "d", "alice", "--role", "root"]) == 2
    assert pki.main(["init", "d", "--days", "0"]) == 2
    assert pki.main(["init", "d", "--host", "bad host"]) == 2
    capsys.readouterr()


def test_help_works(capsys: pytest.CaptureFixture[str]) -> None:
    """--help prints usage for the tool and each command and exits 0."""
    assert pki.main(["--help"]) == 0
    assert "jobworker-certs" in capsys.readouterr().out
    assert pki.main(["client", "--help"]) == 0
    assert "--no-role" in capsys.readouterr().out


# -- the Python API --------------------------------------------------------------------------


def test_write_key_is_never_readable_by_others(tmp_path: Path) -> None:
    """write_key gives 0600 even under umask 0 and when replacing a world-readable file."""
    key, _ = pki.make_ca()
    path = tmp_path / "k.key"
    path.write_text("old")
    path.chmod(0o644)
    old_umask = os.umask(0)
    try:
        pki.write_key(path, key)
    finally:
        os.umask(old_umask)
    assert mode(path) == 0o600
    assert path.read_bytes().startswith(KEY_PEM_HEADER)
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]  # no temporary left behind


def test_load_ca_round_trips_and_checks_the_pair(tmp_path: Path) -> None:
    """load_ca returns what was written and refuses a key that does not match the cert."""
    key, cert = pki.make_ca(cn="test CA")
    pki.write_key(tmp_path / "ca.key", key)
    pki.write_cert(tmp_path / "ca.pem", cert)
    loaded_key, loaded_cert = pki.load_ca(tmp_path)
    assert loaded_cert == cert
    assert loaded_key.public_key() == key.public_key()

    other_key, _ = pki.make_ca()
    pki.write_key(tmp_path / "ca.key", other_key)
    with pytest.raises(pki.PKIError, match="does not match"):
        pki.load_ca(tmp_path)


def test_load_ca_refuses_a_leaf(tmp_path: Path) -> None:
    """load_ca refuses a directory whose ca.pem is not a CA certificate."""
    ca_key, ca_cert = pki.make_ca()
    key, cert = pki.make_client_cert(ca_key, ca_cert, "alice")
    pki.write_key(tmp_path / "ca.key", key)
    pki.write_cert(tmp_path / "ca.pem", cert)
    with pytest.raises(pki.PKIError, match="not a CA"):
        pki.load_ca(tmp_path)


def test_bad_client_certs_have_the_requested_defects() -> None:
    """make_client_cert can omit the OU or EKU, use the wrong EKU, be CA:TRUE or be expired."""
    ca_key, ca_cert = pki.make_ca()

    _, cert = pki.make_client_cert(ca_key, ca_cert, "x", role=None, eku=None)
    assert cert.subject.rfc4514_string() == "CN=x"
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)

    _, cert = pki.make_client_cert(ca_key, ca_cert, "x", eku="serverAuth")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    _, cert = pki.make_client_cert(ca_key, ca_cert, "x", is_ca=True)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    now = datetime.datetime.now(datetime.UTC)
    _, cert = pki.make_client_cert(
        ca_key, ca_cert, "x", not_after=now - datetime.timedelta(days=1)
    )
    assert cert.not_valid_before_utc < cert.not_valid_after_utc < now

    _, cert = pki.make_client_cert(
        ca_key, ca_cert, "x", not_before=now + datetime.timedelta(days=1), days=3
    )
    assert now < cert.not_valid_before_utc < cert.not_valid_after_utc

    with pytest.raises(ValueError):
        pki.make_client_cert(ca_key, ca_cert, "x", eku="codeSigning")


def test_server_cert_without_eku() -> None:
    """make_server_cert(eku=False) leaves out the extended key usage extension."""
    ca_key, ca_cert = pki.make_ca()
    _, cert = pki.make_server_cert(ca_key, ca_cert, [], eku=False)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert cert.subject.rfc4514_string() == "CN=jobworker server"


@needs_openssl
def test_openssl_rejects_expired_and_wrong_purpose(tmp_path: Path) -> None:
    """openssl refuses an expired client cert and a client cert used as a server."""
    ca_key, ca_cert = pki.make_ca()
    pki.write_cert(tmp_path / "ca.pem", ca_cert)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    _, expired = pki.make_client_cert(ca_key, ca_cert, "old", not_after=past)
    pki.write_cert(tmp_path / "old.pem", expired)
    done = openssl_verify("-CAfile", tmp_path / "ca.pem", tmp_path / "old.pem")
    assert done.returncode != 0
    assert "expired" in done.stdout + done.stderr

    _, client = pki.make_client_cert(ca_key, ca_cert, "alice")
    pki.write_cert(tmp_path / "alice.pem", client)
    done = openssl_verify(
        "-CAfile", tmp_path / "ca.pem", "-purpose", "sslserver", tmp_path / "alice.pem"
    )
    assert done.returncode != 0


@needs_openssl
def test_intermediate_chain_and_crl(tmp_path: Path) -> None:
    """A leaf under an intermediate verifies, and stops verifying once the CRL revokes it."""
    root_key, root = pki.make_ca(cn="root CA")
    mid_key, mid = pki.make_intermediate_ca(root_key, root, "issuing CA")
    _, leaf = pki.make_client_cert(mid_key, mid, "alice")
    pki.write_cert(tmp_path / "root.pem", root)
    pki.write_chain(tmp_path / "chain.pem", [leaf, mid])
    pki.write_cert(tmp_path / "mid.pem", mid)
    pki.write_cert(tmp_path / "leaf.pem", leaf)
    base: list[str | Path] = ["-CAfile", tmp_path / "root.pem", "-untrusted", tmp_path / "mid.pem"]
    done = openssl_verify(*base, "-purpose", "sslclient", tmp_path / "leaf.pem")
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(x509.load_pem_x509_certificates((tmp_path / "chain.pem").read_bytes())) == 2

    # -crl_check_all needs a CRL from every CA in the chain.
    pki.write_crl(tmp_path / "root.crl", pki.make_crl(root_key, root, []))
    pki.write_crl(tmp_path / "mid-clean.crl", pki.make_crl(mid_key, mid, []))
    crls: list[str | Path] = ["-crl_check_all", "-CRLfile", tmp_path / "root.crl"]
    done = openssl_verify(
        *base, *crls, "-CRLfile", tmp_path / "mid-clean.crl", tmp_path / "leaf.pem"
    )
    assert done.returncode == 0, done.stdout + done.stderr

    crl = pki.make_crl(mid_key, mid, [leaf.serial_number])
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    pki.write_crl(tmp_path / "mid.crl", crl)
    assert mode(tmp_path / "mid.crl") == 0o644
    done = openssl_verify(*base, *crls, "-CRLfile", tmp_path / "mid.crl", tmp_path / "leaf.pem")
    assert done.returncode != 0
    assert "revoked" in done.stdout + done.stderr


# -- the documented openssl recipe -----------------------------------------------------------


@needs_openssl
def test_openssl_example_script_builds_a_valid_pki(tmp_path: Path) -> None:
    """certs/openssl-example.sh, as documented, yields a chain openssl verifies."""
    out = tmp_path / "pki"
    env = dict(os.environ, SERVER_HOST="jobs.example.com")
    env.update(CLIENT_NAME="bob", CLIENT_ROLE="viewer")
    done = subprocess.run(
        ["sh", str(EXAMPLE_SCRIPT), str(out)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    ca = out / "ca.pem"
    done = openssl_verify(
        "-CAfile", ca, "-purpose", "sslserver", "-verify_hostname", "jobs.example.com",
        out / "server.pem",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    done = openssl_verify("-CAfile", ca, "-purpose", "sslclient", out / "bob.pem")
    assert done.returncode == 0, done.stdout + done.stderr

    client = load_cert(out / "bob.pem")
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "bob"
    ou = client.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert [attr.value for attr in ou] == ["viewer"]
    for key in ("ca.key", "server.key", "bob.key"):
        assert mode(out / key) == 0o600, key
    # What jobworker.pki writes and what the recipe writes must be interchangeable.
    _, ca_cert = pki.load_ca(out)
    assert ca_cert == load_cert(ca)
    assert sorted(p.name for p in out.iterdir()) == [
        "bob.key", "bob.pem", "ca.key", "ca.pem", "server.key", "server.pem",
    ]  # fmt: skip


def test_readme_quotes_the_example_script() -> None:
    """Every openssl command and extension line in certs/README.md is in the tested script."""
    readme = README.read_text()
    assert "openssl-example.sh" in readme
    # The README shows the script run with its defaults: client alice, role admin.
    script = (
        re.sub(r'"\$CLIENT_NAME(\.\w+)"', r"alice\1", EXAMPLE_SCRIPT.read_text())
        .replace("$CLIENT_NAME", "alice")
        .replace("$CLIENT_ROLE", "admin")
    )
    quoted = re.findall(r"^\s*(-addext .*?|-subj .*?|\w+ = .*?)\s*\\?$", readme, re.MULTILINE)
    assert len(quoted) >= 15
    for line in quoted:
        if not line.startswith("subjectAltName"):  # the README adds an example host
            assert line in script, line
    commands = re.findall(r"^(openssl (?:req|x509 -req) .*?)\s*\\?$", readme, re.MULTILINE)
    assert len(commands) == 5
    for command in commands:
        assert command in script, command
