"""Timestamps: the cached formatters give exactly what datetime's strftime gave, always."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import example, given
from hypothesis import strategies as st

from jobworker.jobs.logs import stamp
from jobworker.wire.timestamps import UTCStamp, iso8601

# From before the cache: the formulas the output must keep matching.
ISO_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
STAMP_FORMAT = "%Y%m%dT%H%M%S.%fZ"


def reference(when: float, fmt: str) -> str:
    return datetime.fromtimestamp(when, UTC).strftime(fmt)


# Anything datetime can represent comfortably (years ~1653 to ~9892), and instants a hair
# either side of a microsecond's half-way point, where rounding carries into the second.
instants = st.floats(min_value=-1e10, max_value=2.5e11, allow_nan=False)
near_half = st.builds(lambda s, us, nudge: s + (us + 0.5) / 1e6 + nudge,
                      st.integers(-10**9, 4 * 10**9), st.integers(0, 999_999),
                      st.sampled_from([0.0, 1e-9, -1e-9, 1e-7, -1e-7]))


@given(st.one_of(instants, near_half))
@example(0.0)
@example(-0.0000004)
@example(-0.0000006)
@example(1_795_000_000.9999995)
@example(1_795_000_000.25)
def test_iso8601_and_stamp_match_strftime(when: float) -> None:
    """iso8601 and logs.stamp equal datetime.fromtimestamp(...).strftime for any instant."""
    assert iso8601(when) == reference(when, ISO_FORMAT)
    assert stamp(when) == reference(when, STAMP_FORMAT)


@given(st.lists(st.one_of(instants, near_half,
                          st.floats(min_value=1_795_000_000, max_value=1_795_000_003)),
                min_size=1, max_size=30))
def test_cached_second_never_leaks_into_another(sequence: list[float]) -> None:
    """Calls in any order, back and forth across seconds, each match the reference."""
    iso = UTCStamp("%Y-%m-%dT%H:%M:%S")
    for when in sequence:
        assert iso(when) == reference(when, ISO_FORMAT)
