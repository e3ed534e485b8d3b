"""The TLS policy as data and checks, shared by daemon and client: TLS 1.3 only, leaf
certificates fit for their purpose (an EKU, not a CA), and the server's name or address.

OpenSSL accepts a leaf with no extended key usage at all, and a CA certificate presented
as a leaf; both ends refuse them here.
"""

from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from service_identity import VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)

#: The only TLS version either end speaks.
TLS_VERSION = "TLSv1.3"
#: What a client certificate must be fit for, and a server certificate.
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH


def leaf_problem(cert: x509.Certificate, purpose: x509.ObjectIdentifier) -> str | None:
    """Why a leaf certificate is unfit for ``purpose``, or None if it is fit."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            return "certificate is a CA certificate, not a leaf"
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "certificate has no extended key usage"
    if purpose not in eku:
        name = "clientAuth" if purpose == CLIENT_AUTH else "serverAuth"
        return f"certificate lacks the {name} extended key usage"
    return None


def is_ip_address(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (checked as one) rather than a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def server_name_problem(cert: x509.Certificate, host: str) -> str | None:
    """Why the server's leaf does not name ``host`` (a DNS name or an IP address), or None."""
    try:
        if is_ip_address(host):
            verify_certificate_ip_address(cert, host)
        else:
            verify_certificate_hostname(cert, host)
    except VerificationError:
        return f"server certificate does not match {host!r}"
    except Exception as e:  # a malformed certificate: never let it escape a TLS callback
        return f"server certificate could not be checked: {e}"
    return None
