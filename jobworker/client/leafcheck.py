"""The leaf-certificate policy of ``jobworker.wire.tlspolicy`` read straight from DER.

The stdlib ``ssl`` module does not check extended key usage, and importing ``cryptography``
to do so would cost jwclient more than the rest of a call; a certificate's extensions are a
few nested TLV records, walked here.
"""

from __future__ import annotations

import base64
import binascii

#: The DER contents of the OIDs the policy looks at.
EKU_OID = bytes.fromhex("551d25")  # 2.5.29.37 extKeyUsage
BASIC_CONSTRAINTS_OID = bytes.fromhex("551d13")  # 2.5.29.19
SERVER_AUTH = bytes.fromhex("2b06010505070301")  # 1.3.6.1.5.5.7.3.1
CLIENT_AUTH = bytes.fromhex("2b06010505070302")  # 1.3.6.1.5.5.7.3.2
_NAMES = {SERVER_AUTH: "serverAuth", CLIENT_AUTH: "clientAuth"}

_SEQUENCE, _OID, _BOOLEAN, _OCTETS, _EXTENSIONS = 0x30, 0x06, 0x01, 0x04, 0xA3


class BadCertificate(ValueError):
    """The bytes are not a DER certificate this walk can read."""


def _tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """The tag at ``pos``, and where its contents start and end."""
    if pos + 2 > end:
        raise BadCertificate("truncated")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if not 0 < count <= 4 or pos + count > end:
            raise BadCertificate("bad length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > end:
        raise BadCertificate("truncated")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        tag, cstart, cend = _tlv(data, start, end)
        out.append((tag, cstart, cend))
        start = cend
    return out


def extensions(der: bytes) -> dict[bytes, bytes]:
    """Each extension's OID contents → its value (the OCTET STRING's contents)."""
    tag, start, end = _tlv(der, 0, len(der))
    if tag != _SEQUENCE:
        raise BadCertificate("not a certificate")
    tag, start, end = _tlv(der, start, end)  # tbsCertificate
    if tag != _SEQUENCE:
        raise BadCertificate("not a certificate")
    found: dict[bytes, bytes] = {}
    for tag, cstart, cend in _children(der, start, end):
        if tag != _EXTENSIONS:
            continue
        seq_tag, sstart, send = _tlv(der, cstart, cend)
        if seq_tag != _SEQUENCE:
            raise BadCertificate("bad extensions")
        for ext_tag, estart, eend in _children(der, sstart, send):
            parts = _children(der, estart, eend) if ext_tag == _SEQUENCE else []
            if len(parts) < 2 or parts[0][0] != _OID or parts[-1][0] != _OCTETS:
                raise BadCertificate("bad extension")
            oid, value = parts[0], parts[-1]
            found[der[oid[1]:oid[2]]] = der[value[1]:value[2]]
    return found


def leaf_problem(der: bytes, purpose: bytes) -> str | None:
    """Why a DER leaf certificate is unfit for ``purpose`` (an EKU OID's contents), or
    None: the same verdicts, in the same words, as ``tlspolicy.leaf_problem``."""
    try:
        exts = extensions(der)
        constraints = exts.get(BASIC_CONSTRAINTS_OID)
        if constraints is not None:
            _, start, end = _tlv(constraints, 0, len(constraints))
            inner = _children(constraints, start, end)
            if inner and inner[0][0] == _BOOLEAN and constraints[inner[0][1]:inner[0][2]] != b"\x00":
                return "certificate is a CA certificate, not a leaf"
        eku = exts.get(EKU_OID)
        if eku is None:
            return "certificate has no extended key usage"
        _, start, end = _tlv(eku, 0, len(eku))
        purposes = {eku[s:e] for tag, s, e in _children(eku, start, end) if tag == _OID}
    except BadCertificate as e:
        return f"certificate could not be read: {e}"
    if purpose not in purposes:
        return f"certificate lacks the {_NAMES.get(purpose, 'required')} extended key usage"
    return None


def pem_certificates(data: bytes) -> list[bytes]:
    """The DER of each certificate in a PEM file, in order."""
    out = []
    marker, end_marker = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    for block in data.split(marker)[1:]:
        body = block.split(end_marker, 1)[0]
        try:
            out.append(base64.b64decode(b"".join(body.split()), validate=True))
        except (binascii.Error, ValueError):
            raise BadCertificate("malformed PEM certificate") from None
    return out
