"""UTC timestamps as the logs and the audit records write them, cheaply: the second is
formatted once and reused (strftime costs more than the rest of a record's sealing)."""

from __future__ import annotations

import time

_last: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def utc_second(second: int) -> str:
    """%Y-%m-%dT%H:%M:%S of a Unix second, in UTC."""
    global _last
    cached, text = _last
    if second != cached:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last = (second, text)
    return text
