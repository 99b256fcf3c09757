"""Secret values replaced by `***` in an operation's output as it streams (pure: no I/O).

The controller sends, with each operation, the secret values it could reveal. Every value is
replaced in the forms a command is likely to print it in, the longest match first:

- the value itself, and each line of a multi-line value on its own (lines shorter than
  MIN_LINE_BYTES once stripped of surrounding blanks are not used: `}` or `-----` are not secrets);
- its standard and URL-safe base64, of the value and of the value followed by a newline (what
  `echo "$S" | base64` encodes): the whole padded encoding, GNU base64's 76-column wrapped lines
  for long values, and, at each of the three byte alignments the value can have inside a larger
  input, the core characters that do not depend on the bytes around it (as CI systems do);
- its URL-encoded forms (`quote(value, safe='')` and `quote_plus(value)`).

Values shorter than MIN_VALUE_BYTES are not used as patterns: replacing every `abc` would make
output unreadable and protect nothing. A derived form shorter than that is dropped too.

Streaming: a value split across two reads is still caught, because the redactor holds back the
end of what it has seen when that end could be the start of a pattern — never more than the
longest pattern minus one byte — until more data comes or the stream ends (`flush`). Bytes that
cannot start a pattern go out at once, so ordinary output is not delayed.
"""

from __future__ import annotations

import base64
import functools
import itertools
import os.path
import re
import urllib.parse
from typing import Iterable

REPLACEMENT = b"***"
MIN_VALUE_BYTES = 4
MIN_LINE_BYTES = 8
BASE64_COLUMNS = 76   # GNU base64's default line length

# Characters at the start of a base64 encoding that depend on k unknown bytes before the value.
_LEADING = {0: 0, 1: 2, 2: 3}


def _base64_forms(payload: bytes) -> set[bytes]:
    forms: set[bytes] = set()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        whole = encode(payload)
        forms.add(whole)
        if len(whole) > BASE64_COLUMNS:
            lines = [whole[i:i + BASE64_COLUMNS] for i in range(0, len(whole), BASE64_COLUMNS)]
            forms.add(b"\n".join(lines))
            forms.update(line for line in lines if len(line) >= MIN_LINE_BYTES)
        for k in (0, 1, 2):
            encoded = encode(b"\0" * k + payload).rstrip(b"=")
            # The last character also holds bits of whatever follows, unless the input ends on a
            # three-byte boundary.
            trailing = 0 if (k + len(payload)) % 3 == 0 else 1
            forms.add(encoded[_LEADING[k]:len(encoded) - trailing])
    return forms


def forms(value: str) -> set[bytes]:
    """Every form of one value that is replaced (empty if the value is too short to use)."""
    raw = value.encode()
    if len(raw) < MIN_VALUE_BYTES:
        return set()
    out = {raw, urllib.parse.quote(value, safe="").encode(), urllib.parse.quote_plus(value).encode()}
    if "\n" in value:
        out.update(line.strip().encode() for line in value.split("\n")
                   if len(line.strip().encode()) >= MIN_LINE_BYTES)
    for payload in (raw, raw + b"\n"):
        out.update(_base64_forms(payload))
    return {form for form in out if len(form) >= MIN_VALUE_BYTES}


def _radix(patterns: list[bytes]) -> dict:
    """A radix tree of sorted, distinct patterns: {first byte: (edge label, child)}, and
    {None: True} where a pattern ends. Nodes exist only where patterns branch or end."""
    node: dict = {}
    if patterns and not patterns[0]:
        node[None] = True
        patterns = patterns[1:]
    for first, group in itertools.groupby(patterns, key=lambda p: p[0]):
        group = list(group)
        label = os.path.commonprefix(group)
        node[first] = (label, _radix([p[len(label):] for p in group]))
    return node


def _regex(node: dict) -> bytes:
    """A regex for the patterns below `node`; a greedy `(…)?` past a pattern's end makes the
    longest pattern win at any position. Nesting only grows where patterns branch or end."""
    branches = [re.escape(label) + _regex(child)
                for _first, (label, child) in sorted((k, v) for k, v in node.items() if k is not None)]
    if not branches:
        return b""
    body = branches[0] if len(branches) == 1 else b"(?:" + b"|".join(branches) + b")"
    return b"(?:" + body + b")?" if None in node else body


class Patterns:
    """The compiled patterns of one operation; `redactor()` gives one streaming state per stream."""

    def __init__(self, values: Iterable[str]) -> None:
        found: set[bytes] = set()
        for value in values:
            found |= forms(value)
        self.forms: tuple[bytes, ...] = tuple(sorted(found, key=lambda f: (-len(f), f)))
        self.longest = len(self.forms[0]) if self.forms else 0
        self._tree = _radix(sorted(self.forms))
        self.regex: re.Pattern[bytes] | None = None
        if self.forms:
            try:
                self.regex = re.compile(_regex(self._tree))
            except (RecursionError, re.error):
                # Thousands of nested prefixes: a flat alternation, longest first, is also correct.
                self.regex = re.compile(b"|".join(re.escape(f) for f in self.forms))

    def redactor(self) -> "Redactor":
        return Redactor(self)

    def redact(self, data: bytes) -> bytes:
        """All of `data` at once."""
        return self.regex.sub(REPLACEMENT, data) if self.regex is not None else data

    def redact_text(self, text: str) -> str:
        return self.redact(text.encode()).decode(errors="replace") if self.regex is not None else text

    def pending_from(self, data: bytes) -> int:
        """Where the longest end of `data` that could still grow into a pattern starts
        (len(data) if none): those bytes must wait for what comes next."""
        for start in range(max(0, len(data) - self.longest + 1), len(data)):
            if self._continues(data, start):
                return start
        return len(data)

    def _continues(self, data: bytes, pos: int) -> bool:
        """`data[pos:]` is the start of a pattern longer than it."""
        node, end = self._tree, len(data)
        while True:
            entry = node.get(data[pos])
            if entry is None:
                return False
            label, child = entry
            if end - pos < len(label):
                return label.startswith(data[pos:])
            if not data.startswith(label, pos):
                return False
            pos += len(label)
            if pos == end:
                return len(child) > (None in child)   # a branch goes on from here
            node = child


MAX_ERROR_CHARS = 2000  # a result's error is one line for an operator, not a second output channel


def bounded(error: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`error` cut to about `limit` characters, keeping its start and its end, which is where a
    command or systemctl says what went wrong. Cut only once redacted: a cut could halve a secret."""
    if len(error) <= limit:
        return error
    keep = limit // 2
    return f"{error[:keep]} … ({len(error) - 2 * keep} characters left out) … {error[-keep:]}"


@functools.lru_cache(maxsize=16)
def _compiled(values: tuple[str, ...]) -> Patterns:
    return Patterns(values)


def patterns(values: Iterable[str]) -> Patterns:
    """The compiled patterns of these values; the operations of one environment share them."""
    return _compiled(tuple(sorted(set(values))))


class Redactor:
    """One stream's state: `feed` what was read, `flush` at the end of the stream."""

    def __init__(self, patterns: Patterns) -> None:
        self.patterns = patterns
        self.held = b""

    def feed(self, data: bytes) -> bytes:
        regex = self.patterns.regex
        if regex is None:
            return data
        buf = self.held + data
        cut = self.patterns.pending_from(buf)
        out, pos = [], 0
        # A match starting before `cut` cannot grow with later data: it is final.
        for match in regex.finditer(buf):
            if match.start() >= cut:
                break
            out += (buf[pos:match.start()], REPLACEMENT)
            pos = match.end()
        keep = max(pos, cut)
        out.append(buf[pos:keep])
        self.held = buf[keep:]
        return b"".join(out)

    def flush(self) -> bytes:
        """The end of the stream: what was held back, redacted."""
        held, self.held = self.held, b""
        return self.patterns.redact(held)


_HTTP_USERINFO = re.compile(r"(?i)\b(https?://)[^/@\s]+@")  # an http user name is often a token
_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/:@\s]*):[^/@\s]*@")


def sanitise(text: str) -> str:
    """Hide the credentials in any URL in `text`: passwords, and user names of http URLs."""
    return _PASSWORD.sub(r"\1:***@", _HTTP_USERINFO.sub(r"\1***@", text))
