"""Who is on the other end: the roles there are, and the identity a certificate carries.

The one home of both: the certificate tools issue them, the daemon authorizes by them.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

#: Roles the daemon understands; a client certificate carries one as its OU.
ROLES = ("admin", "user", "viewer")


@dataclass(frozen=True)
class PeerIdentity:
    """Who is on the other end: CN is the identity, OU the role it claims."""

    name: str
    role: str | None
    serial: int
    issuer: str


def identity_of(cert: x509.Certificate) -> PeerIdentity:
    """The identity a (verified) client certificate names."""

    def first(oid: x509.ObjectIdentifier) -> str | None:
        attrs = cert.subject.get_attributes_for_oid(oid)
        value = attrs[0].value if attrs else None
        return value if isinstance(value, str) else None

    return PeerIdentity(
        name=first(NameOID.COMMON_NAME) or "",
        role=first(NameOID.ORGANIZATIONAL_UNIT_NAME),
        serial=cert.serial_number,
        issuer=cert.issuer.rfc4514_string(),
    )
