"""The `.env` format the controller writes and the agent (and systemd) read.

`NAME=value` on one line when the value is plain; otherwise `NAME="..."` in double quotes, where
a backslash escapes `"`, `\\`, `$` and `` ` `` and a line break stays a line break. That is the
syntax of systemd's EnvironmentFile= and of the usual dotenv readers, so a multi-line secret (a
PEM key, say) survives every reader unchanged.
"""

from __future__ import annotations

import re

_ESCAPED = '"\\$`'


def _plain(value: str) -> bool:
    return not (set(value) & set('\n\r"\'\\$`') or value != value.strip())


def quote(value: str) -> str:
    return '"' + "".join("\\" + c if c in _ESCAPED else c for c in value) + '"'


def render(values: dict[str, str]) -> bytes:
    """`.env` content for these values (names sorted). A NUL cannot be held: ValueError."""
    lines = []
    for name, value in sorted(values.items()):
        if "\0" in value:
            raise ValueError(f"the value of {name} contains a NUL byte")
        lines.append(f"{name}={value if _plain(value) else quote(value)}\n")
    return "".join(lines).encode()


def parse(text: str) -> dict[str, str]:
    """What `render` wrote, plus blank lines and `#` comments; a plain value is taken as is."""
    env: dict[str, str] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, value = line.split("=", 1)
        if not value.startswith('"'):
            env[name.strip()] = value
            continue
        chars: list[str] = []
        rest = value[1:]
        while True:
            j, closed = 0, False
            while j < len(rest):
                c = rest[j]
                if c == "\\" and j + 1 < len(rest) and rest[j + 1] in _ESCAPED:
                    chars.append(rest[j + 1])
                    j += 2
                elif c == '"':
                    closed = True
                    break
                else:
                    chars.append(c)
                    j += 1
            if closed or i >= len(lines):
                break
            chars.append("\n")  # the value goes on over the next line
            rest = lines[i]
            i += 1
        env[name.strip()] = "".join(chars)
    return env


# ---------------------------------------------------------------- values built from others

_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def _pieces(template: str):
    """A template's literal text and ${NAME} references, in order: ("text", s) or ("ref", NAME).
    `$$` is a literal `$`, and so is a `$` not followed by `{`."""
    i = 0
    while i < len(template):
        at = template.find("$", i)
        if at < 0:
            yield "text", template[i:]
            return
        yield "text", template[i:at]
        nxt = template[at + 1:at + 2]
        if nxt == "$":
            yield "text", "$"
            i = at + 2
        elif nxt == "{":
            end = template.find("}", at + 2)
            if end < 0:
                raise ValueError(f"${{ at offset {at} is not closed by }}; write $$ for a literal $")
            name = template[at + 2:end]
            if not _NAME.fullmatch(name):
                raise ValueError(f"${{{name[:40]}}} is not a variable name (capitals, digits and _)")
            yield "ref", name
            i = end + 1
        else:
            yield "text", "$"
            i = at + 1


def references(template: str) -> list[str]:
    """The names a template refers to, in order (ValueError if it is malformed)."""
    return [value for kind, value in _pieces(template) if kind == "ref"]


def expand(template: str, values: dict[str, str]) -> str:
    """The template with each ${NAME} replaced by values[NAME] (KeyError if one is missing)."""
    return "".join(value if kind == "text" else values[value] for kind, value in _pieces(template))
