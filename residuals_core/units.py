"""Sizes and durations as people read and write them: one parser, one way to print each."""

from __future__ import annotations

import math

from .errors import ResidualsError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(value: int | str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count, as huggingface_hub's splitter reads them."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if not isinstance(value, str):
        raise ResidualsError(
            f"{value!r} is not a size.", "Give a size such as 5GB, 500MB or 2GiB (or a number of bytes)."
        )
    text = value.strip().upper().replace(" ", "")
    number = text.rstrip("KMGTIB")
    unit = text[len(number) :]
    try:
        size = float(number) * _UNITS[unit]
        if not math.isfinite(size):
            raise ValueError(value)
    except (ValueError, KeyError):
        raise ResidualsError(
            f"{value!r} is not a size.", "Give a size such as 5GB, 500MB or 2GiB (or a number of bytes)."
        ) from None
    if size < 1:
        raise ResidualsError(
            f"A shard size of {value!r} is not a positive size.", "Give a size such as 5GB or 500MB."
        )
    return int(size)


def format_size(nbytes: float) -> str:
    """Decimal units, as the Hub shows file sizes: 512 B, 38.7 KB, 1.9 MB, 206.16 GB."""
    if nbytes < 1e3:
        return f"{nbytes:.0f} B"
    if nbytes < 1e6:
        return f"{nbytes / 1e3:.1f} KB"
    if nbytes < 1e9:
        return f"{nbytes / 1e6:.1f} MB"
    if nbytes < 1e12:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e12:.2f} TB"


def format_duration(seconds: float) -> str:
    """45 s, 16 min, 2 h 05 min: whole minutes rounded up from 90 s on (a wait is never shorter than said)."""
    if seconds < 90:
        return f"{math.ceil(seconds)} s"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60:02d} min"
