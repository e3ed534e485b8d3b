"""Sizes as people write them (``512M``, ``1G``): K, M, G and T are powers of 1024."""

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


__all__ = ["parse_size"]
