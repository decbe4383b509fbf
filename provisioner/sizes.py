"""Parse the human sizes, durations and times people write ("2GiB", "30m", "7d",
"2026-01-31") into bytes, seconds and epoch seconds.

One place for this so the tenants file, the REST API and the CLI accept the same spellings.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

_BYTE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
    "ti": 2**40, "tib": 2**40,
}
_TIME_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")

#: Anything above this is a typo, not a request (1 EiB).
MAX_BYTES = 2**60
#: A year: longer timeouts are refused rather than overflowing timers.
MAX_SECONDS = 365 * 86400


def _split(text: str, units: dict[str, int], what: str) -> float:
    match = _NUMBER.match(text)
    if not match:
        raise ValueError(f"cannot parse {text!r} as {what}")
    number, unit = match.groups()
    factor = units.get(unit.lower())
    if factor is None:
        raise ValueError(f"unknown unit {unit!r} in {text!r}; use one of {sorted(u for u in units if u)}")
    return float(number) * factor


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number")
    if value < 0:
        raise ValueError(f"{what} must not be negative")
    return value


def _number(value: object, units: dict[str, int], what: str, example: str) -> float:
    """A finite, non-negative number from a number or a string with a unit; anything else
    (a list, a bool, null) is refused by name rather than reaching ``float()``."""
    if isinstance(value, str):
        return _finite(_split(value, units, f"a {what}"), what)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number or a string such as {example!r}")
    return _finite(float(value), what)


def parse_bytes(value: int | float | str) -> int:
    """Bytes from an int or a string such as ``"2GiB"`` / ``"512MB"``."""
    number = _number(value, _BYTE_UNITS, "size", "2GiB")
    if number > MAX_BYTES:
        raise ValueError(f"size {value!r} is larger than {MAX_BYTES} bytes")
    return int(number)


def parse_seconds(value: int | float | str) -> float:
    """Seconds from a number or a string such as ``"30m"`` / ``"1h"`` / ``"45s"``."""
    number = _number(value, _TIME_UNITS, "duration", "30m")
    if number > MAX_SECONDS:
        raise ValueError(f"duration {value!r} is longer than {MAX_SECONDS} seconds")
    return number


#: Numbers above this are epoch seconds (1973 on); below, seconds ago.
EPOCH_FLOOR = 1e8


def parse_instant(value: str, now: float) -> float:
    """Epoch seconds from epoch seconds, an ISO 8601 date or time (UTC unless it says
    otherwise), or a duration before ``now`` ("7d", "24h", or seconds below 1e8)."""
    try:
        number: float | None = float(value)
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number):
            raise ValueError(f"{value!r} is not a time")
        return number if number > EPOCH_FLOOR else now - number
    try:
        return now - parse_seconds(value)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is neither a time (epoch seconds, ISO 8601 such as "
                         "2026-01-31) nor a duration ago (7d, 24h)") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def format_bytes(value: int) -> str:
    """Short human form used in quota messages."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= factor:
            return f"{value / factor:.3g}{unit}"
    return f"{value}B"
