"""Build the jobworker PKI: a CA, a server certificate and client certificates.

For tests and tools that need certificates (good or deliberately bad) made at run time, never
committed; ``jobworker-certs`` (``jobworker.pki.cli``) writes a development PKI with them.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker.wire.identity import ROLES

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "ROLES",
    "SERVER_CERT",
    "SERVER_KEY",
    "PKIError",
    "load_ca",
    "make_ca",
    "make_client_cert",
    "make_crl",
    "make_intermediate_ca",
    "make_server_cert",
    "parse_host",
    "valid_client_name",
    "write_cert",
    "write_chain",
    "write_crl",
    "write_key",
]

#: File names inside a PKI directory.
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"


DEFAULT_CA_CN = "jobworker CA"
DEFAULT_SERVER_CN = "jobworker server"
DEFAULT_CA_DAYS = 3650
DEFAULT_INTERMEDIATE_DAYS = 1825
DEFAULT_LEAF_DAYS = 825
DEFAULT_CRL_DAYS = 30
#: Upper bound for --days: far enough for anyone, near enough that dates stay representable.
MAX_DAYS = 36500

#: Hosts every server certificate names, so local clients verify without extra flags.
DEFAULT_SERVER_HOSTS = ("localhost", "127.0.0.1", "::1")

#: Backdating absorbs clock skew between the machine that issues and the one that verifies.
BACKDATE = datetime.timedelta(minutes=5)

_CN_MAX = 64  # RFC 5280 ub-common-name
_CLIENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Names that would overwrite the CA or server files in the same directory.
RESERVED_CLIENT_NAMES = frozenset({"ca", "server"})
_DNS_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_NAME_RE = re.compile(rf"(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*\.?")

GeneratedKey = ec.EllipticCurvePrivateKey
IssuerKey = CertificateIssuerPrivateKeyTypes
GeneralName = x509.DNSName | x509.IPAddress


class PKIError(Exception):
    """A problem the operator can fix (missing or mismatched CA, refusing to overwrite)."""


# -- building blocks ----------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> GeneratedKey:
    # P-256: fast enough to generate in every test, and accepted by every TLS stack we target.
    return ec.generate_private_key(ec.SECP256R1())


def _hash_for(key: IssuerKey) -> hashes.SHA256 | None:
    # Ed25519/Ed448 sign the message itself; passing a hash to them is an error.
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _validity(
    days: int,
    not_before: datetime.datetime | None,
    not_after: datetime.datetime | None,
) -> tuple[datetime.datetime, datetime.datetime]:
    """Resolve the validity window; explicit bounds win so tests can build expired certificates."""
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    now = _now()
    if not_after is None:
        start = not_before if not_before is not None and not_before > now else now
        not_after = start + datetime.timedelta(days=days)
    if not_before is None:
        not_before = min(now - BACKDATE, not_after - datetime.timedelta(days=1))
    if not_after <= not_before:
        raise ValueError("not_after must be later than not_before")
    return not_before, not_after


def _name(cn: str, ou: str | None = None) -> x509.Name:
    if not cn or len(cn) > _CN_MAX:
        raise ValueError(f"common name must be 1 to {_CN_MAX} characters: {cn!r}")
    attributes = []
    if ou is not None:
        if not ou or len(ou) > _CN_MAX:
            raise ValueError(f"organizational unit must be 1 to {_CN_MAX} characters: {ou!r}")
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attributes)


def _authority_key_id(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    # Reuse the issuer's own SKI when it has one, so chain building matches on the same bytes.
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        public_key: Any = issuer_cert.public_key()  # any key type that can issue
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage(
    *, key_encipherment: bool = False, key_cert_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: GeneratedKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def parse_host(host: str) -> GeneralName:
    """Turn a host into a SAN entry; IP literals must be IPAddress entries to match by IP."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]  # a bracketed IPv6 literal, as written in URLs
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    if len(text) > 253 or not _DNS_NAME_RE.fullmatch(text):
        raise ValueError(f"not a valid host name or IP address: {host!r}")
    return x509.DNSName(text.rstrip(".").lower())


def valid_client_name(name: str) -> bool:
    """Say whether NAME is safe as both a common name and a file name in the PKI directory."""
    return bool(_CLIENT_NAME_RE.fullmatch(name)) and name.lower() not in RESERVED_CLIENT_NAMES


# -- certificates ---------------------------------------------------------------------------------


def make_ca(
    cn: str = DEFAULT_CA_CN, days: int = DEFAULT_CA_DAYS
) -> tuple[GeneratedKey, x509.Certificate]:
    """Make a self-signed root CA; its key signs every other certificate in the PKI."""
    key = _new_key()
    not_before, not_after = _validity(days, None, None)
    name = _name(cn)
    cert = (
        _builder(name, name, key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_intermediate_ca(
    parent_key: IssuerKey,
    parent_cert: x509.Certificate,
    cn: str,
    days: int = DEFAULT_INTERMEDIATE_DAYS,
    path_length: int | None = 0,
) -> tuple[GeneratedKey, x509.Certificate]:
    """Make a CA signed by another CA, for tests of chains longer than one link."""
    key = _new_key()
    not_before, not_after = _validity(days, None, None)
    cert = (
        _builder(_name(cn), parent_cert.subject, key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_authority_key_id(parent_cert), critical=False)
        .sign(parent_key, _hash_for(parent_key))
    )
    return key, cert


def make_server_cert(
    ca_key: IssuerKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    days: int = DEFAULT_LEAF_DAYS,
    eku: bool = True,
    *,
    cn: str | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[GeneratedKey, x509.Certificate]:
    """Make the daemon's certificate; clients check its SANs against the address they dialled.

    The SANs are localhost, 127.0.0.1 and ::1 plus ``hosts``. ``eku=False`` leaves out the
    serverAuth extended key usage, to build a certificate clients must reject.
    """
    sans: list[GeneralName] = []
    for host in [*DEFAULT_SERVER_HOSTS, *hosts]:
        entry = parse_host(host)
        if entry not in sans:
            sans.append(entry)
    if cn is None:
        cn = hosts[0] if hosts and len(hosts[0]) <= _CN_MAX else DEFAULT_SERVER_CN
    key = _new_key()
    not_before, not_after = _validity(days, not_before, not_after)
    builder = (
        _builder(_name(cn), ca_cert.subject, key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(key_encipherment=True), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )
    if eku:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return key, builder.sign(ca_key, _hash_for(ca_key))


_EKUS = {
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
}


def make_client_cert(
    ca_key: IssuerKey,
    ca_cert: x509.Certificate,
    name: str,
    role: str | None = "user",
    days: int = DEFAULT_LEAF_DAYS,
    eku: str | None = "clientAuth",
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    is_ca: bool = False,
) -> tuple[GeneratedKey, x509.Certificate]:
    """Make a client certificate: CN is the caller's identity, OU its role.

    The other knobs exist to build certificates the daemon must refuse: ``role=None`` (no OU)
    or a role outside :data:`ROLES`, ``eku="serverAuth"`` or ``None`` (no EKU extension at all),
    ``not_after`` in the past, ``not_before`` in the future, ``is_ca=True``.
    """
    if eku is not None and eku not in _EKUS:
        raise ValueError(f"eku must be one of {sorted(_EKUS)} or None, not {eku!r}")
    key = _new_key()
    not_before, not_after = _validity(days, not_before, not_after)
    builder = (
        _builder(_name(name, role), ca_cert.subject, key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(key_cert_sign=is_ca), critical=True)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([_EKUS[eku]]), critical=False)
    return key, builder.sign(ca_key, _hash_for(ca_key))


def make_crl(
    ca_key: IssuerKey,
    ca_cert: x509.Certificate,
    revoked_serials: Sequence[int],
    days: int = DEFAULT_CRL_DAYS,
    crl_number: int = 1,
) -> x509.CertificateRevocationList:
    """Make a CRL revoking ``revoked_serials``, signed by the CA that issued them."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - BACKDATE)
        .next_update(now + datetime.timedelta(days=days))
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - BACKDATE)
            .build()
        )
    return builder.sign(ca_key, _hash_for(ca_key))


# -- files ----------------------------------------------------------------------------------------


def _write_atomic(path: str | os.PathLike[str], data: bytes, mode: int) -> None:
    """Write via a temporary file that has ``mode`` before it holds a byte, then rename it.

    Readers see the old file or the new one, never half of one, and a key is never readable
    by others even for an instant, whatever the umask or the old file's mode.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_key(path: str | os.PathLike[str], key: PrivateKeyTypes) -> None:
    """Write a private key as unencrypted PKCS#8 PEM, mode 0600; replaces any existing file."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(path, data, 0o600)


def write_cert(path: str | os.PathLike[str], cert: x509.Certificate) -> None:
    """Write one certificate as PEM, mode 0644."""
    write_chain(path, [cert])


def write_chain(path: str | os.PathLike[str], certs: Sequence[x509.Certificate]) -> None:
    """Write certificates as one PEM bundle (leaf first, then intermediates), mode 0644."""
    data = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)
    _write_atomic(path, data, 0o644)


def write_crl(path: str | os.PathLike[str], crl: x509.CertificateRevocationList) -> None:
    """Write a CRL as PEM, mode 0644."""
    _write_atomic(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)


def _public_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_ca(directory: str | os.PathLike[str]) -> tuple[IssuerKey, x509.Certificate]:
    """Load ca.key and ca.pem from ``directory``, checking they are a usable, matching pair."""
    directory = Path(directory)
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    for path in (key_path, cert_path):
        if not path.exists():
            raise PKIError(f"no CA in {directory}: {path} is missing (run 'jobworker-certs init' first)")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except TypeError as e:  # raised for encrypted keys
        raise PKIError(f"{key_path}: {e}") from None
    if not isinstance(
        key,
        (
            ec.EllipticCurvePrivateKey,
            rsa.RSAPrivateKey,
            ed25519.Ed25519PrivateKey,
            ed448.Ed448PrivateKey,
        ),
    ):
        raise PKIError(f"{key_path}: this key type cannot sign certificates")
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise PKIError(f"{key_path} does not match {cert_path}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise PKIError(f"{cert_path} is not a CA certificate")
    return key, cert
