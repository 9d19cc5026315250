"""Parse human durations such as ``30d``, ``12h``, ``90m``, ``10s`` or ``1w``.

>>> parse_duration("12h")
datetime.timedelta(seconds=43200)
"""

from __future__ import annotations

import re
from datetime import timedelta

from shared.errors import UsageError

__all__ = ["parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PATTERN = re.compile(r"^\s*(\d{1,9})\s*([smhdw])\s*$")


def parse_duration(text: str) -> timedelta:
    """Return the positive duration that ``text`` spells.

    Raises:
        UsageError: ``text`` is not a whole number followed by one of s, m, h, d, w.
    """
    match = _PATTERN.fullmatch(text)
    if match is None or int(match.group(1)) == 0:
        raise UsageError(
            f"duration must be a positive whole number with a unit s, m, h, d or w "
            f"(like 30d, 12h, 10s), got {text!r}",
            check="duration",
        )
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
