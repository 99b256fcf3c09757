"""Pure formatting for deployctl: tables, sizes, ages, and agent-prefixed output lines."""

from __future__ import annotations

import time

from typing import Sequence

COLOURS = (36, 33, 35, 32, 34, 91, 96, 93, 95, 92)
PARTIAL_LINE_LIMIT = 64 << 10


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def utc_minute(t: float) -> str:
    """A time as tables show it: UTC, to the minute."""
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))


def span(seconds: float) -> str:
    """A rough length of time for a person: 90s, 45m, 30h, 12d."""
    for limit, unit in ((120, "s"), (7200, "m"), (172800, "h")):
        if seconds < limit:
            return f"{int(seconds // {'s': 1, 'm': 60, 'h': 3600}[unit])}{unit}"
    return f"{int(seconds // 86400)}d"


def age(seconds: float) -> str:
    return "now" if seconds < 2 else f"{span(seconds)} ago"


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.2f}s"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def printable(text: str, limit: int | None = None) -> str:
    """`text` safe for a terminal cell: what agents report is theirs to choose, so control
    characters (escape sequences, line breaks) show as `?`, and a `limit` cuts it with `…`."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if limit is None or len(text) <= limit else text[:limit - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    rows = [[printable(str(c)) for c in row] for row in [headers, *rows]]
    widths = [max(len(c) for c in col) for col in zip(*rows)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def limits_table(rows: Sequence[dict]) -> str:
    """Each host's use of the environment's limits, from `deployctl status` rows: once per host,
    since all of the environment's services on a host share its limits there. What the host
    applies wins over the spec's figures (a spec changed since the last deploy)."""
    seen: dict[str, list[str]] = {}
    for r in rows:
        if not r.get("host") or r["host"] in seen or "limits" not in r:
            continue
        use, spec = r.get("use") or {}, r["limits"]
        memory_max = use.get("memory_max_bytes") or spec.get("memory_bytes", 0)
        processes_max = use.get("processes_max") or spec.get("processes", 0)
        cpu_max = use.get("cpu_max") or spec.get("cpu", 0)
        seen[r["host"]] = [
            r["host"],
            f"{_of(use.get('memory_bytes'), size)} of {size(memory_max) if memory_max else 'no limit'}",
            _of(use.get("memory_peak_bytes"), size),
            f"{_of(use.get('cpu_s'), duration)} (max {cpu_max:g} CPU)" if cpu_max else _of(use.get("cpu_s"), duration),
            f"{_of(use.get('processes'), str)} of {processes_max or 'no limit'}",
            str(spec.get("mysql_connections", "-")),
        ]
    if not seen:
        return ""
    return table(["HOST", "MEMORY", "PEAK", "CPU", "PROCESSES", "MYSQL CONNECTIONS"], list(seen.values()))


def _of(value, form) -> str:
    return "-" if value is None else form(value)


def prefix_for(agent_id: str, width: int, colour_index: int | None) -> bytes:
    label = f"{agent_id.ljust(width)} |"
    if colour_index is not None:
        label = f"\x1b[{COLOURS[colour_index % len(COLOURS)]}m{label}\x1b[0m"
    return (label + " ").encode()


class LinePrefixer:
    """Prefix every line with its agent; hold back a partial line so agents don't interleave
    mid-line, unless it grows past PARTIAL_LINE_LIMIT (then it goes out as it is)."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.rest = b""
        self.mid_line = False  # a partial line was already written without its end

    def feed(self, data: bytes) -> bytes | bytearray:
        buf = self.rest + data
        cut = buf.rfind(b"\n") + 1
        out = bytearray()
        if cut:
            # Two copies in all: the replace, and appending it. The prefix the replace puts after
            # the last newline, and the partial line behind it, are cut off again.
            if not self.mid_line:
                out += self.prefix
            out += buf.replace(b"\n", b"\n" + self.prefix)
            del out[len(out) - len(self.prefix) - (len(buf) - cut):]
            self.mid_line = False
        self.rest = buf[cut:]
        if len(self.rest) > PARTIAL_LINE_LIMIT:
            out += (b"" if self.mid_line else self.prefix) + self.rest
            self.rest, self.mid_line = b"", True
        return out

    def finish(self) -> bytes:
        """What is left, ended with a newline if the command did not end its last line."""
        if self.rest:
            out = (b"" if self.mid_line else self.prefix) + self.rest + b"\n"
        else:
            out = b"\n" if self.mid_line else b""
        self.rest, self.mid_line = b"", False
        return out
