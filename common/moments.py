"""Moments an operator writes (`10m` ago, `2026-12-02T22:40`), as the UTC stamps log files carry."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from common import errors

_AGO = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_FORMATS = ("%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S",
            "%Y-%m-%d %H:%M", "%Y-%m-%d")


class MomentError(errors.BadInput):
    pass


def stamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse(text: str, now: datetime) -> str:
    """The stamp of `text`: a duration before `now` (10m, 1h30m, 2d, 45s) or a date and time in
    UTC (2026-12-02T22:40, with seconds or a trailing Z if one likes)."""
    text = text.strip()
    ago = _AGO.fullmatch(text)
    if text and ago and any(ago.groups()):
        d, h, m, s = (int(x or 0) for x in ago.groups())
        return stamp(now - timedelta(days=d, hours=h, minutes=m, seconds=s))
    bare = text.removesuffix("Z").removesuffix("z")
    for form in _FORMATS:
        try:
            return stamp(datetime.strptime(bare, form).replace(tzinfo=timezone.utc))
        except ValueError:
            continue
    raise MomentError(f"{text[:40]!r} is not a moment; write a time ago (10m, 2h, 1d) or a UTC date and time "
                      "(2026-12-02T22:40)")
