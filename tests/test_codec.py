"""codec: msgpack round trips, the strict decoder's limits, the request envelope, schemas."""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobworker.wire import codec, frames, schema
from jobworker.wire.codec import MAX_DEPTH, decode, encode
from jobworker.wire.errors import BadRequest
from jobworker.wire.frames import parse_request

# -- strategies ------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.binary(max_size=40),
)


def wire_values(depth: int = MAX_DEPTH) -> st.SearchStrategy[Any]:
    """Every value the codec promises to carry: containers at most ``depth`` deep."""
    if depth <= 1:
        return scalars
    inner = wire_values(depth - 1)
    return st.one_of(
        scalars,
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(max_size=12), inner, max_size=5),
    )


def nested(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# -- round trips -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(wire_values())
def test_every_valid_value_round_trips(value: Any) -> None:
    """Any value within the limits decodes to exactly what was encoded (str stays str, bytes bytes)."""
    assert decode(encode(value), 1 << 20) == value


@settings(max_examples=200, deadline=None)
@given(wire_values(4))
def test_types_survive_the_round_trip(value: Any) -> None:
    """str and bytes, int and float, list and map are never confused on the way through."""

    def shape(v: Any) -> Any:
        if isinstance(v, list):
            return ["list", [shape(x) for x in v]]
        if isinstance(v, dict):
            return ["map", {k: shape(x) for k, x in v.items()}]
        return type(v).__name__

    assert shape(decode(encode(value), 1 << 20)) == shape(value)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_bad_request_only(payload: bytes) -> None:
    """No byte sequence makes decode raise anything but BadRequest."""
    try:
        decode(payload)
    except BadRequest:
        pass


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8), scalars, min_size=1, max_size=6))
def test_every_truncation_of_a_frame_is_refused(value: dict[str, Any]) -> None:
    """A payload cut short anywhere is a BadRequest, never a partial value."""
    payload = encode(value)
    for cut in range(len(payload)):
        with pytest.raises(BadRequest):
            decode(payload[:cut])


def test_trailing_bytes_after_the_value_are_refused() -> None:
    """One frame carries exactly one value: extra data after it is refused."""
    with pytest.raises(BadRequest):
        decode(encode({"id": 1}) + b"\xc0")


# -- size limits -----------------------------------------------------------------------------


def test_payload_over_max_len_is_refused_before_decoding() -> None:
    """A payload longer than the limit is refused by its length alone."""
    with pytest.raises(BadRequest, match="over the 1024-byte limit"):
        decode(encode("x" * 2000), 1024)
    assert decode(encode("x" * 1000), 1024) == "x" * 1000


@pytest.mark.parametrize("header, element, limit", [
    (b"\xdd", b"\x90", "max_array_len"),  # array32 of a million empty arrays
    (b"\xdd", b"\x80", "max_array_len"),  # array32 of a million empty maps
    (b"\xdf", b"\xa0\x90", "max_map_len"),  # map32 of a million "" -> [] entries
])
def test_a_million_empty_containers_are_refused_at_once(header: bytes, element: bytes,
                                                        limit: str) -> None:
    """The container header's count is refused before a single element is built."""
    count = 1_000_000
    payload = header + struct.pack("!I", count) + element * count
    with pytest.raises(BadRequest, match=limit):
        decode(payload, len(payload))


def test_container_counts_at_the_limits_are_accepted() -> None:
    """The limits are inclusive: a 4096-item array and a 64-entry map decode."""
    assert decode(encode([[]] * codec.MAX_ARRAY_LEN)) == [[]] * codec.MAX_ARRAY_LEN
    big_map = {str(i): i for i in range(codec.MAX_MAP_LEN)}
    assert decode(encode(big_map)) == big_map
    with pytest.raises(BadRequest):
        decode(encode([0] * (codec.MAX_ARRAY_LEN + 1)))
    with pytest.raises(BadRequest):
        decode(encode({str(i): i for i in range(codec.MAX_MAP_LEN + 1)}))


def test_strings_longer_than_the_frame_limit_are_refused() -> None:
    """A str or bin header claiming more than max_len bytes is refused."""
    with pytest.raises(BadRequest):
        decode(b"\xdb" + struct.pack("!I", 5000) + b"a" * 5000, 1024)


# -- nesting ---------------------------------------------------------------------------------


def test_nesting_up_to_the_bound_is_accepted() -> None:
    """Containers exactly MAX_DEPTH deep decode, arrays and maps alike."""
    assert decode(encode(nested(MAX_DEPTH))) == nested(MAX_DEPTH)
    deep_map: Any = 0
    for _ in range(MAX_DEPTH):
        deep_map = {"k": deep_map}
    assert decode(encode(deep_map)) == deep_map


def test_nesting_past_the_bound_is_refused() -> None:
    """One level more than MAX_DEPTH is a BadRequest naming the bound."""
    with pytest.raises(BadRequest, match=f"deeper than {MAX_DEPTH}"):
        decode(encode(nested(MAX_DEPTH + 1)))
    with pytest.raises(BadRequest, match=f"deeper than {MAX_DEPTH}"):
        decode(encode({"params": {"a": nested(MAX_DEPTH - 1)}}))


def test_very_deep_nesting_is_a_bad_request_with_a_reason() -> None:
    """A 60,000-deep array is refused as too deep, not with a RecursionError or an empty reason."""
    with pytest.raises(BadRequest, match=f"deeper than {MAX_DEPTH}"):
        decode(b"\x91" * 60_000 + b"\xc0")


# -- what a strict decoder refuses -------------------------------------------------------------


@pytest.mark.parametrize("payload", [
    b"\xd4\x01\x00",  # fixext 1
    b"\xd5\x05\x00\x00",  # fixext 2
    b"\xd8\x7f" + b"\x00" * 16,  # fixext 16
    b"\xc7\x00\x05",  # ext 8, zero length: reaches the ext hook
    b"\xc7\x03\x05abc",  # ext 8
    b"\xc8\x00\x03\x05abc",  # ext 16
    b"\xc9\x00\x00\x00\x03\x05abc",  # ext 32
    b"\xd6\xff\x00\x00\x00\x00",  # timestamp 32
    b"\xd7\xff" + b"\x00" * 8,  # timestamp 64
    b"\xc7\x0c\xff" + b"\x00" * 12,  # timestamp 96
    b"\xc7\x00\xff",  # empty timestamp
    b"\x81\xa1a\xd4\x01\x00",  # an ext inside a map
])
def test_extension_types_are_refused(payload: bytes) -> None:
    """msgpack ext types, timestamps included, are refused wherever they appear."""
    with pytest.raises(BadRequest):
        decode(payload)


def test_duplicate_keys_are_refused() -> None:
    """A map naming a key twice is refused, at the top and nested."""
    with pytest.raises(BadRequest, match="duplicate"):
        decode(b"\x82\xa2id\x01\xa2id\x02")
    with pytest.raises(BadRequest, match="duplicate"):
        decode(b"\x81\xa1p\x82\xa1a\x01\xa1a\x01")


@pytest.mark.parametrize("key", [1, -1, None, True, 1.5, b"id", (1, 2)],
                         ids=["int", "negint", "nil", "bool", "float", "bytes", "array"])
def test_non_string_keys_are_refused(key: Any) -> None:
    """Map keys must be str: ints, nil, bools, floats, bytes and arrays are all refused."""
    payload = msgpack.packb({key: 1}, use_bin_type=True)
    with pytest.raises(BadRequest):
        decode(payload)
    nested_payload = b"\x81\xa1p" + payload
    with pytest.raises(BadRequest):
        decode(nested_payload)


def test_invalid_utf8_in_a_string_is_refused() -> None:
    """A str whose bytes are not UTF-8 is refused, not decoded with replacement characters."""
    with pytest.raises(BadRequest):
        decode(b"\xa2\xc3\x28")


def test_the_reserved_type_byte_is_refused_with_a_reason() -> None:
    """0xc1 (never used by msgpack) is refused with a message that says something."""
    with pytest.raises(BadRequest) as info:
        decode(b"\xc1")
    assert info.value.message.split(":", 1)[1].strip()


# -- the request envelope ----------------------------------------------------------------------


def test_a_well_formed_request_parses() -> None:
    """id, method and params come out as given; params defaults to an empty map."""
    assert parse_request({"id": 7, "method": "status", "params": {"job": "x"}}) == \
        frames.Request(7, "status", {"job": "x"})
    assert parse_request({"id": 0, "method": "whoami"}).params == {}
    assert parse_request({"id": 2**53 - 1, "method": "m"}).id == 2**53 - 1


@pytest.mark.parametrize("frame", [
    [1, "whoami", {}],
    "whoami",
    {"method": "whoami"},
    {"id": "1", "method": "whoami"},
    {"id": True, "method": "whoami"},
    {"id": -1, "method": "whoami"},
    {"id": 2**53, "method": "whoami"},
    {"id": 1.0, "method": "whoami"},
    {"id": None, "method": "whoami"},
    {"id": 1},
    {"id": 1, "method": 5},
    {"id": 1, "method": b"whoami"},
    {"id": 1, "method": ""},
    {"id": 1, "method": "m" * 65},
    {"id": 1, "method": "whoami", "params": []},
    {"id": 1, "method": "whoami", "params": "x"},
    {"id": 1, "method": "whoami", "params": None},
    {"id": 1, "method": "whoami", "extra": 1},
])
def test_malformed_envelopes_are_bad_requests(frame: Any) -> None:
    """Every wrong type or missing field of the envelope is a BadRequest."""
    with pytest.raises(BadRequest):
        parse_request(frame)


def test_request_id_of_recovers_only_valid_ids() -> None:
    """A malformed request's error carries its id only when that id is itself valid."""
    assert frames.request_id_of({"id": 5, "method": 3}) == 5
    assert frames.request_id_of({"id": "5"}) is None
    assert frames.request_id_of({"id": True}) is None
    assert frames.request_id_of({"id": 2**53}) is None
    assert frames.request_id_of([5]) is None


envelopes = st.dictionaries(
    st.sampled_from(["id", "method", "params", "extra"]),
    st.one_of(scalars, st.integers(min_value=-1, max_value=2**53 + 1),
              st.text(max_size=70), st.dictionaries(st.text(max_size=4), scalars, max_size=2),
              st.lists(scalars, max_size=2)),
    max_size=4)


@settings(max_examples=500, deadline=None)
@given(envelopes)
def test_the_quick_envelope_check_agrees_with_the_careful_one(frame: dict[str, Any]) -> None:
    """parse_request's one-test path accepts exactly what the field-by-field one accepts,
    with the same result."""
    try:
        careful: frames.Request | BadRequest = frames._parse_request_slowly(frame)
    except BadRequest as e:
        careful = e
    try:
        quick: frames.Request | BadRequest = parse_request(frame)
    except BadRequest as e:
        quick = e
    if isinstance(careful, BadRequest):
        assert isinstance(quick, BadRequest) and quick.message == careful.message
    else:
        assert quick == careful


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2**53 - 1), wire_values(3),
       st.sampled_from(["result", "chunk"]))
def test_a_reply_head_and_an_encoded_value_equal_the_encoded_reply(
        rid: int, value: Any, key: str) -> None:
    """A cached record sent after reply_head is the same bytes as encoding the reply."""
    assert codec.reply_head(rid, key) + encode(value) == encode({"id": rid, key: value})


@pytest.mark.parametrize("rid", [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32,
                                 2**53 - 1])
def test_reply_heads_at_every_integer_width(rid: int) -> None:
    assert codec.reply_head(rid) + encode(None) == encode({"id": rid, "result": None})


@pytest.mark.parametrize("n", [0, 1, 15, 16, 65535, 65536])
def test_an_array_head_and_encoded_elements_equal_the_encoded_list(n: int) -> None:
    items = [{"i": i} for i in range(n)]
    assert codec.array_head(n) + b"".join(map(encode, items)) == encode(items)


def test_a_reply_decoder_keeps_the_limits_but_not_the_duplicate_key_check() -> None:
    """decode_reply (a client reading its daemon) still refuses extension types, frames
    over the limit and absurd nesting; a duplicate key keeps its last entry."""
    assert codec.decode_reply(b"\x82\xa1a\x01\xa1a\x02") == {"a": 2}
    with pytest.raises(BadRequest, match="ext"):
        codec.decode_reply(b"\xd4\x01\x00")
    with pytest.raises(BadRequest, match="over the 10-byte limit"):
        codec.decode_reply(encode("x" * 20), 10)
    with pytest.raises(BadRequest, match="nests too deeply"):
        codec.decode_reply(b"\x91" * 100_000 + b"\x01", 1 << 20)
    deep = b"\x91" * (MAX_DEPTH + 2) + b"\x01"  # refused by decode, fine for a reply
    with pytest.raises(BadRequest):
        decode(deep)
    assert codec.decode_reply(deep) == msgpack.unpackb(deep)


# -- per-method schemas ------------------------------------------------------------------------


SCHEMA = schema.schema(
    {"name": schema.string(8, nonempty=True), "n": schema.integer(1, 10)},
    {"ratio": (schema.number(0.0, 1.0), 0.5), "flag": (schema.boolean(), False),
     "pick": (schema.one_of("a", "b"), "a"), "items": (schema.list_of(schema.string(4), 3), []),
     "job": (schema.job_ref(), None)},
)


def test_schema_fills_defaults_and_keeps_given_values() -> None:
    """Required values pass through, absent optional ones take their defaults."""
    assert SCHEMA.validate({"name": "x", "n": 3}) == {
        "name": "x", "n": 3, "ratio": 0.5, "flag": False, "pick": "a", "items": [],
        "job": None}
    out = SCHEMA.validate({"name": "x", "n": 3, "ratio": 1, "flag": True, "pick": "b",
                           "items": ["ab"], "job": 42})
    assert out["ratio"] == 1.0 and type(out["ratio"]) is float
    assert (out["flag"], out["pick"], out["items"], out["job"]) == (True, "b", ["ab"], 42)


@pytest.mark.parametrize("params, message", [
    ({"n": 1}, "missing parameter 'name'"),
    ({"name": "x", "n": 1, "zzz": 1}, "unknown parameters: zzz"),
    ({"name": 1, "n": 1}, "'name' must be a string"),
    ({"name": b"x", "n": 1}, "'name' must be a string"),
    ({"name": "", "n": 1}, "must not be empty"),
    ({"name": "123456789", "n": 1}, "longer than 8"),
    ({"name": "a\0b", "n": 1}, "NUL"),
    ({"name": "x", "n": "1"}, "'n' must be an integer"),
    ({"name": "x", "n": True}, "'n' must be an integer"),
    ({"name": "x", "n": 1.0}, "'n' must be an integer"),
    ({"name": "x", "n": 11}, "'n' must be an integer"),
    ({"name": "x", "n": 1, "ratio": "0.5"}, "'ratio' must be a number"),
    ({"name": "x", "n": 1, "ratio": True}, "'ratio' must be a number"),
    ({"name": "x", "n": 1, "ratio": math.nan}, "'ratio' must be a number"),
    ({"name": "x", "n": 1, "ratio": math.inf}, "'ratio' must be a number"),
    ({"name": "x", "n": 1, "ratio": 1.5}, "'ratio' must be a number"),
    ({"name": "x", "n": 1, "flag": 1}, "'flag' must be true or false"),
    ({"name": "x", "n": 1, "pick": "c"}, "'pick' must be one of"),
    ({"name": "x", "n": 1, "items": "ab"}, "'items' must be a list"),
    ({"name": "x", "n": 1, "items": ["a"] * 4}, "more than 3 items"),
    ({"name": "x", "n": 1, "items": ["a", 2]}, r"'items\[1\]' must be a string"),
    ({"name": "x", "n": 1, "job": 0}, "'job' must be an integer"),
    ({"name": "x", "n": 1, "job": ""}, "'job' must not be empty"),
    ({"name": "x", "n": 1, "job": [1]}, "'job' must be a string"),
    ({"name": "x", "n": 1, "job": "a\0b"}, "'job' must not contain NUL"),
    ({"name": "x", "n": 1, "job": "j" * 65}, "'job' is longer than 64"),
])
def test_wrong_types_and_values_are_bad_requests(params: dict[str, Any], message: str) -> None:
    """Each wrong type, range or unknown key is a BadRequest naming the parameter."""
    with pytest.raises(BadRequest, match=message):
        SCHEMA.validate(params)
