"""Mutual TLS 1.3 contexts for daemon and client: PEM files loaded and checked, peers
verified by the policy of ``jobworker.wire.tlspolicy``.

Built on pyOpenSSL contexts directly rather than Twisted's ``ssl:`` strings or
``CertificateOptions``, because those cannot express what we need: a required client
certificate from one CA, EKU checks on the leaf on both sides, and CRLs that can be
swapped without a restart.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from jobworker._twisted import fail_verification
from jobworker.wire.tlspolicy import (
    CLIENT_AUTH,
    SERVER_AUTH,
    TLS_VERSION,
    is_ip_address,
    leaf_problem,
    server_name_problem,
)

#: OpenSSL's constant for each version the policy may name.
_OPENSSL_VERSIONS = {"TLSv1.3": SSL.TLS1_3_VERSION}

class TLSConfigError(Exception):
    """A certificate, key, CA or CRL file is missing, unreadable or inconsistent."""


class PeerCertificateError(Exception):
    """The server's certificate chained to our CA but is unfit: wrong name or purpose."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} {path}: {e.strerror}") from None


def _load_cert(path: str, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, what))
    except ValueError:
        raise TLSConfigError(f"{what} {path} is not a PEM certificate") from None


def load_crls(paths: list[str]) -> list[x509.CertificateRevocationList]:
    """Every CRL in each PEM file (one per issuing CA)."""
    crls = []
    marker = b"-----BEGIN X509 CRL-----"
    for path in paths:
        data = _read(path, "CRL")
        blocks = [marker + part for part in data.split(marker)[1:]]
        if not blocks:
            raise TLSConfigError(f"CRL file {path} holds no PEM CRL")
        for block in blocks:
            try:
                crls.append(x509.load_pem_x509_crl(block))
            except ValueError:
                raise TLSConfigError(f"CRL file {path} holds a malformed CRL") from None
    return crls


def _base_context(ca: str, cert: str, key: str, purpose: x509.ObjectIdentifier,
                  server: bool) -> SSL.Context:
    ca_certs = _read(ca, "CA file")
    if b"-----BEGIN CERTIFICATE-----" not in ca_certs:
        raise TLSConfigError(f"CA file {ca} holds no PEM certificate")
    own = _load_cert(cert, "certificate")
    key_data = _read(key, "private key")
    try:
        private_key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        raise TLSConfigError(f"private key {key} is not an unencrypted PEM key") from None
    own_purpose = SERVER_AUTH if server else CLIENT_AUTH
    problem = leaf_problem(own, own_purpose)
    if problem:
        raise TLSConfigError(f"{cert}: {problem}")

    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(_OPENSSL_VERSIONS[TLS_VERSION])
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    try:
        ctx.use_certificate(own)
        ctx.use_privatekey(private_key)  # type: ignore[arg-type]
        ctx.check_privatekey()
    except (SSL.Error, TypeError, ValueError):
        raise TLSConfigError(f"private key {key} does not match certificate {cert}") from None
    # Send intermediates that follow the leaf in the certificate file.
    chain = _read(cert, "certificate").split(b"-----BEGIN CERTIFICATE-----")[2:]
    for extra in chain:
        try:
            ctx.add_extra_chain_cert(
                x509.load_pem_x509_certificate(b"-----BEGIN CERTIFICATE-----" + extra))
        except (ValueError, SSL.Error):
            raise TLSConfigError(f"certificate file {cert} holds a malformed chain") from None
    try:
        ctx.load_verify_locations(os.fsencode(ca))
    except SSL.Error:
        raise TLSConfigError(f"CA file {ca} could not be loaded") from None
    return ctx


VerifyCallback = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]

#: OpenSSL's verdict on a leaf whose extended key usage does not allow its use.
_X509_V_ERR_INVALID_PURPOSE = 26


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Server side: require a client certificate chained to our CA, valid now, fit for
    clientAuth and not revoked.  ``reload_crls`` swaps the context for new connections;
    live ones keep theirs."""

    log = Logger()

    def __init__(self, ca: str, cert: str, key: str, crls: list[str] | None = None,
                 now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(
                     datetime.UTC)) -> None:
        self._paths = (ca, cert, key)
        self._crl_paths = list(crls or [])
        self._now = now
        self._crls: list[x509.CertificateRevocationList] = []
        self._context, self._crls = self._build(self._crl_paths)

    def _build(self, crl_paths: list[str]
               ) -> tuple[SSL.Context, list[x509.CertificateRevocationList]]:
        ctx = _base_context(*self._paths, purpose=CLIENT_AUTH, server=True)
        crls = load_crls(crl_paths) if crl_paths else []
        if crls:
            store = ctx.get_cert_store()
            assert store is not None
            for crl in crls:
                store.add_crl(crl)
            store.set_flags(crypto.X509StoreFlags.CRL_CHECK | crypto.X509StoreFlags.CRL_CHECK_ALL)
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _server_verify)
        return ctx, crls

    def reload_crls(self) -> None:
        """Re-read the CRL files; on error raise and keep the current context."""
        self._context, self._crls = self._build(self._crl_paths)
        self.check_crl_dates()

    def check_crl_dates(self) -> None:
        """Log each CRL that has expired (every client of its CA is then refused) or will
        within a day, with its nextUpdate."""
        now = self._now()
        for crl in self._crls:
            next_update = crl.next_update_utc
            if next_update is None:
                continue
            issuer = crl.issuer.rfc4514_string()
            if next_update <= now:
                self.log.error("tls.crl_expired issuer={issuer} next_update={next_update}: "
                               "every client certificate of this CA is refused until a "
                               "new CRL is loaded", issuer=issuer,
                               next_update=next_update.isoformat())
            elif next_update - now < datetime.timedelta(days=1):
                self.log.warn("tls.crl_expiring issuer={issuer} next_update={next_update}",
                              issuer=issuer, next_update=next_update.isoformat())

    def revoked(self, serial: int, issuer: str) -> bool:
        """Whether the CRLs now loaded revoke the certificate ``serial`` of ``issuer``
        (an RFC 4514 name), for connections that were accepted before."""
        return any(crl.issuer.rfc4514_string() == issuer
                   and crl.get_revoked_certificate_by_serial_number(serial) is not None
                   for crl in self._crls)

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def _server_verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int,
                   ok: int) -> bool:
    if not ok:
        return False
    if depth == 0:
        return leaf_problem(cert.to_cryptography(), CLIENT_AUTH) is None
    return True


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """Client side: our certificate, the server's chain to our CA, its serverAuth EKU,
    and its name or IP address checked with service_identity."""

    def __init__(self, ca: str, cert: str, key: str, hostname: str) -> None:
        self._context = _base_context(ca, cert, key, purpose=SERVER_AUTH,
                                      server=False)
        self.hostname = hostname
        self._is_ip = is_ip_address(hostname)

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        conn = SSL.Connection(self._context, None)
        if not self._is_ip:
            conn.set_tlsext_host_name(self.hostname.encode("idna"))
        conn.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                        self._verifier(tlsProtocol))
        return conn

    def _verifier(self, tls_protocol: object) -> VerifyCallback:
        def verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int,
                   ok: int) -> bool:
            if depth != 0 or (not ok and errno != _X509_V_ERR_INVALID_PURPOSE):
                return bool(ok)
            leaf = cert.to_cryptography()
            problem = leaf_problem(leaf, SERVER_AUTH)
            if problem is None and not ok:  # OpenSSL's purpose check saw more than we do
                problem = "server certificate is not valid for serverAuth"
            if problem is None:
                problem = server_name_problem(leaf, self.hostname)
            if problem is not None:
                fail_verification(tls_protocol, Failure(PeerCertificateError(problem)))
                return False
            return True

        return verify
