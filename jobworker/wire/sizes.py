"""Sizes and durations as people write them: ``512M``, ``1G`` (K, M, G and T are powers of
1024); ``250ms``, ``30s``, ``5m``, ``1h``, ``2d``."""

from __future__ import annotations

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``1048576``, ``512K``, ``512M``, ``1.5G``, ``2T`` (a trailing
    ``B`` or ``iB`` is allowed); ValueError with the reason otherwise."""
    value = text.strip().upper()
    for suffix in ("IB", "B"):
        if value[:-len(suffix)][-1:] in "KMGT" and value.endswith(suffix):
            value = value[:-len(suffix)]
            break
    unit = value[-1:] if value[-1:] in ("K", "M", "G", "T") else ""
    number = value[:-1] if unit else value
    try:
        size = float(number)
    except ValueError:
        raise ValueError(f"bad size {text!r}: use bytes or a size such as 512M or 1G "
                         "(K, M, G, T: powers of 1024)") from None
    if not 0 < size < float(1 << 62) or size != size:
        raise ValueError(f"bad size {text!r}: must be more than 0")
    return int(size * _UNITS[unit])


_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``30``, ``250ms``, ``30s``, ``5m``, ``1h``, ``2d``;
    ValueError with the reason otherwise (range checks are the caller's)."""
    for suffix in ("ms", "s", "m", "h", "d"):
        if text.endswith(suffix):
            number, scale = text[:-len(suffix)], _SECONDS[suffix]
            break
    else:
        number, scale = text, 1.0
    try:
        return float(number) * scale
    except ValueError:
        raise ValueError(f"bad duration {text!r}") from None


__all__ = ["parse_duration", "parse_size"]
