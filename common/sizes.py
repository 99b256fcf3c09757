"""Sizes as operators write them (512M, 2G, 1.5T): K, M, G and T are powers of 1024. A spec's
limits and `deployctl agents grant --capacity` read them alike."""

from __future__ import annotations

import re

_SIZE = re.compile(r"(\d+(?:\.\d+)?)(\s*)([KMGT]?)((?:I?B)?)", re.IGNORECASE)
_SHIFTS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def parse(text: str, strict: bool = False) -> float | None:
    """The bytes `text` says, not yet rounded (a caller checks its range on what was written), or
    None if it is no size. `strict` takes a number and a letter only: 16G, not 16 GiB."""
    found = _SIZE.fullmatch(text)
    if found is None or strict and (found[2] or found[4]):
        return None
    return float(found[1]) * (1 << _SHIFTS[found[3].upper()])
