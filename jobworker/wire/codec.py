"""msgpack with strict limits: decoding what a peer sent, and encoding replies around
payloads that are already encoded (cached records, log chunks) without copying them."""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from jobworker.wire.errors import BadRequest
from jobworker.wire.frames import DEFAULT_MAX_FRAME

#: Deepest nesting of containers accepted in one frame.
MAX_DEPTH = 8
#: Most elements in one array, and entries in one map.  Small, so that a frame of
#: a million empty containers is refused at once instead of being built.
MAX_ARRAY_LEN = 4096
MAX_MAP_LEN = 64


def _strict_map(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    # strict_map_key still lets bytes keys through; the protocol's keys are all str.
    # Checking the dict's keys is the same test (a bytes key never equals a str one, so
    # none is merged away) and a plain loop is cheaper than any() over a generator.
    result = dict(pairs)
    for key in result:
        if type(key) is not str:
            raise ValueError("map keys must be strings")
    if len(result) != len(pairs):
        raise ValueError("duplicate map key")
    return result


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError("msgpack extension types are not accepted")


def encode(value: Any) -> bytes:
    """Encode one frame payload: str stays str, bytes stays bin."""
    return msgpack.packb(value, use_bin_type=True)


class Encoded(bytes):
    """A result that is already msgpack: sent as is, not encoded again.  (A bytes subclass
    rather than a wrapper: made in C, with no Python frame, once per ``status``.)"""


def _uint(n: int) -> bytes:
    """msgpack's shortest encoding of a non-negative int, as ``packb`` writes it."""
    if n < 0x80:
        return bytes((n,))
    if n < 0x100:
        return b"\xcc" + bytes((n,))
    if n < 0x10000:
        return b"\xcd" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\xce" + n.to_bytes(4, "big")
    return b"\xcf" + n.to_bytes(8, "big")


_ID_KEY = b"\x82\xa2id"  # a map of two entries, then the key "id"
_KEYS = {key: msgpack.packb(key) for key in ("result", "chunk")}


#: ``reply_head`` of a result whose id takes 2 or 4 bytes (every id past 255: the usual
#: case on a busy connection) in one call instead of four concatenated pieces.
_RESULT_HEAD_16 = struct.Struct(">5sH7s")
_RESULT_HEAD_32 = struct.Struct(">5sI7s")


def reply_head(rid: int, key: str = "result") -> bytes:
    """The encoding of ``{"id": rid, key: value}`` up to ``value``: with an encoded value
    appended it equals ``encode`` of that map byte for byte (a cached job record is sent
    without being decoded and encoded again)."""
    if key == "result" and 0x100 <= rid < 0x100000000:
        if rid < 0x10000:
            return _RESULT_HEAD_16.pack(b"\x82\xa2id\xcd", rid, b"\xa6result")
        return _RESULT_HEAD_32.pack(b"\x82\xa2id\xce", rid, b"\xa6result")
    return _ID_KEY + _uint(rid) + _KEYS[key]


def array_head(n: int) -> bytes:
    """The header of a msgpack array of ``n`` elements (their encodings follow it)."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def encode_chunk_head(rid: int, size: int) -> bytes:
    """The encoding of ``{"id": rid, "chunk": data}`` up to ``data`` itself, for ``size``
    bytes of data: with the data appended it equals ``encode`` of that map byte for byte,
    but a 256 KiB log chunk is not copied through msgpack's buffer on the way."""
    head = reply_head(rid, "chunk")
    if size < 0x100:
        return head + b"\xc4" + size.to_bytes(1, "big")
    if size < 0x10000:
        return head + b"\xc5" + size.to_bytes(2, "big")
    return head + b"\xc6" + size.to_bytes(4, "big")


def decode_reply(payload: bytes | bytearray, max_len: int = DEFAULT_MAX_FRAME) -> Any:
    """``decode`` for a client reading the daemon it authenticated: the same limits on
    size, lengths and extension types, but a map with a duplicate key keeps its last entry
    instead of being refused, and nesting is bounded only by msgpack's own stack limit.
    Policing every map's pairs and every header in Python costs a ``status`` reply (one
    15-key record) about as much again as decoding it."""
    return decode(payload, max_len, trusted=True)


def decode(payload: bytes | bytearray, max_len: int = DEFAULT_MAX_FRAME,
           trusted: bool = False) -> Any:
    """Decode one frame payload or raise L{BadRequest}; never anything else.
    ``trusted``: see ``decode_reply``."""
    if len(payload) > max_len:
        raise BadRequest(f"frame of {len(payload)} bytes is over the {max_len}-byte limit")
    try:
        value = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=max_len,
            max_bin_len=max_len,
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=0,
            ext_hook=_refuse_ext,
            object_pairs_hook=None if trusted else _strict_map,
        )
    except (msgpack.StackError, RecursionError):
        how = "too deeply" if trusted else f"deeper than {MAX_DEPTH} levels"
        raise BadRequest(f"frame nests {how}") from None
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            UnicodeDecodeError) as e:
        # An exception is always truthy: test its text, or FormatError says nothing.
        raise BadRequest(f"undecodable frame: {str(e) or type(e).__name__}") from None
    except Exception as e:  # msgpack raises a few odd types on truncation
        raise BadRequest(f"undecodable frame: {type(e).__name__}") from None
    # Nesting deeper than MAX_DEPTH needs more than MAX_DEPTH container headers; most
    # frames have far fewer bytes that could even be one, and skip the walk.
    if not trusted and len(payload.translate(None, _NOT_CONTAINER_HEADERS)) > MAX_DEPTH:
        _check_depth(value)
    return value


#: Every byte value except msgpack's map and array headers (fixmap, fixarray,
#: array 16/32, map 16/32), for counting candidate headers with one C call.
_NOT_CONTAINER_HEADERS = bytes(
    b for b in range(256) if not (0x80 <= b <= 0x9F or 0xDC <= b <= 0xDF))


def _check_depth(value: Any) -> None:
    # Only containers go on the stack (decoded values are exact dicts and lists): a
    # frame's many scalars cost one type() each instead of a tuple and a pop.
    if type(value) is not dict and type(value) is not list:
        return
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BadRequest(f"frame nests deeper than {MAX_DEPTH} levels")
        for child in item.values() if type(item) is dict else item:
            kind = type(child)
            if kind is dict or kind is list:
                stack.append((child, depth + 1))
