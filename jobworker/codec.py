"""msgpack encoding with strict limits, and the schema checks every frame passes.

Nothing here imports Twisted: these are the wire values shared by daemon and client.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from jobworker.errors import BadRequest

#: Default cap on one frame's payload; the daemon's ``--max-frame``.
DEFAULT_MAX_FRAME = 64 * 1024
#: Deepest nesting of containers accepted in one frame.
MAX_DEPTH = 8
#: Most elements in one array, and entries in one map.  Small, so that a frame of
#: a million empty containers is refused at once instead of being built.
MAX_ARRAY_LEN = 4096
MAX_MAP_LEN = 64
MAX_ID = 2**53


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


# -- frames ---------------------------------------------------------------------


class Request(NamedTuple):
    """One request's envelope (a NamedTuple: built for every frame, so kept cheap)."""

    id: int
    method: str
    params: dict[str, Any]


_ENVELOPE = frozenset({"id", "method", "params"})
_new_request = tuple.__new__


def _check_id(frame: dict[str, Any]) -> int:
    rid = frame.get("id")
    if type(rid) is not int or not 0 <= rid < MAX_ID:
        raise BadRequest("'id' must be an integer from 0 to 2**53")
    return rid


def parse_request(value: Any) -> Request:
    """Check the envelope of a request frame."""
    # The common case in one test: a map of exactly id, method and (optionally) params.
    if type(value) is dict:
        rid, method = value.get("id"), value.get("method")
        params = value.get("params")
        if (type(rid) is int and 0 <= rid < MAX_ID and type(method) is str
                and 0 < len(method) <= 64
                and (type(params) is dict if params is not None else len(value) == 2)
                and len(value) <= 3):
            # tuple.__new__ builds the NamedTuple in C; its own __new__ is a Python frame.
            return _new_request(Request, (rid, method, {} if params is None else params))
    return _parse_request_slowly(value)


def _parse_request_slowly(value: Any) -> Request:
    """``parse_request`` for anything off the common path: the precise error."""
    if not isinstance(value, dict):
        raise BadRequest("a frame must be a map")
    rid = _check_id(value)
    if not value.keys() <= _ENVELOPE:
        extra = set(value) - _ENVELOPE
        raise BadRequest(f"unexpected request fields: {', '.join(sorted(map(str, extra)))}")
    method = value.get("method")
    if not isinstance(method, str) or not 0 < len(method) <= 64:
        raise BadRequest("'method' must be a non-empty string")
    params = value.get("params", {})
    if not isinstance(params, dict):
        raise BadRequest("'params' must be a map")
    return Request(rid, method, params)


def request_id_of(value: Any) -> int | None:
    """Best-effort id of a malformed request, so its error can still be correlated."""
    if isinstance(value, dict):
        rid = value.get("id")
        if type(rid) is int and 0 <= rid < MAX_ID:
            return rid
    return None


# -- per-method parameter schemas ------------------------------------------------

Check = Callable[[str, Any], Any]


def string(max_len: int = 4096, *, nonempty: bool = False, no_nul: bool = True) -> Check:
    def check(name: str, v: Any) -> str:
        if not isinstance(v, str):
            raise BadRequest(f"'{name}' must be a string")
        if len(v) > max_len:
            raise BadRequest(f"'{name}' is longer than {max_len} characters")
        if nonempty and not v:
            raise BadRequest(f"'{name}' must not be empty")
        if no_nul and "\0" in v:
            raise BadRequest(f"'{name}' must not contain NUL")
        return v

    return check


def integer(lo: int = 0, hi: int = 2**63 - 1) -> Check:
    def check(name: str, v: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise BadRequest(f"'{name}' must be an integer from {lo} to {hi}")
        return v

    return check


def number(lo: float = 0.0, hi: float = 10.0**9) -> Check:
    def check(name: str, v: Any) -> float:
        if type(v) not in (int, float) or not lo <= v <= hi or v != v:
            raise BadRequest(f"'{name}' must be a number from {lo:g} to {hi:g}")
        return float(v)

    return check


def boolean() -> Check:
    def check(name: str, v: Any) -> bool:
        if type(v) is not bool:
            raise BadRequest(f"'{name}' must be true or false")
        return v

    return check


def one_of(*choices: str) -> Check:
    def check(name: str, v: Any) -> str:
        if v not in choices:
            raise BadRequest(f"'{name}' must be one of: {', '.join(choices)}")
        return v

    return check


def list_of(item: Check, max_items: int = 1024) -> Check:
    def check(name: str, v: Any) -> list[Any]:
        if not isinstance(v, list):
            raise BadRequest(f"'{name}' must be a list")
        if len(v) > max_items:
            raise BadRequest(f"'{name}' has more than {max_items} items")
        return [item(f"{name}[{i}]", x) for i, x in enumerate(v)]

    return check


def job_ref() -> Check:
    """A job id (string) or a pid (integer)."""
    as_str, as_int = string(64, nonempty=True), integer(1, 2**31)

    def check(name: str, v: Any) -> str | int:
        # Every job method checks one: the usual id is accepted without further calls.
        if type(v) is str and 0 < len(v) <= 64 and "\0" not in v:
            return v
        return as_int(name, v) if type(v) is int else as_str(name, v)

    return check


@dataclass(frozen=True)
class Schema:
    """Required and optional parameters of one method; unknown keys are refused."""

    required: dict[str, Check]
    optional: dict[str, tuple[Check, Any]]
    _known: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Every request goes through validate: its set of known names is built once.
        object.__setattr__(self, "_known", frozenset(self.required) | frozenset(self.optional))

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        if not params.keys() <= self._known:
            unknown = set(params) - self._known
            raise BadRequest(f"unknown parameters: {', '.join(sorted(map(str, unknown)))}")
        out: dict[str, Any] = {}
        for name, check in self.required.items():
            if name not in params:
                raise BadRequest(f"missing parameter '{name}'")
            out[name] = check(name, params[name])
        for name, (check, default) in self.optional.items():
            v = params.get(name)
            out[name] = default if v is None else check(name, v)
        return out


def schema(required: dict[str, Check] | None = None,
           optional: dict[str, tuple[Check, Any]] | None = None) -> Schema:
    return Schema(required or {}, optional or {})
