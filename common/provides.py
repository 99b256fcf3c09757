"""What an agent can provide, and the shape every one of its settings must have.

Both sides check the same rules: the agent when it loads its configuration (so a mistake is
named at start), the controller on every hello (so a hostile agent's text never reaches a file or
a command on another host). Settings that reach other hosts (an address, a host, a port) must be
an IP literal or an RFC 1123 host name and a number; settings only ever used on the agent itself
(its nginx folder, its admin commands) must still be absolute paths or one-line commands.
"""

from __future__ import annotations

import ipaddress
import re

PROVIDES = ("mysql", "redis", "nginx")

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_PATH = re.compile(r"/[A-Za-z0-9._/@+,=~-]*\Z")
MAX_COMMAND = 1024


def valid_host(text: str) -> bool:
    """An IP literal (v4, or v6 without brackets) or an RFC 1123 host name."""
    if not isinstance(text, str) or not text:
        return False
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    name = text[:-1] if text.endswith(".") else text
    # All-numeric labels would read as a (malformed) IPv4 address to most resolvers.
    return (len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))
            and not name.replace(".", "").isdigit())


def valid_port(text: str) -> bool:
    """A TCP port, 1–65535, in plain decimal digits."""
    return isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= 5 and 1 <= int(text) <= 65535


def url_host(host: str) -> str:
    """The host as it is written in a URL or an nginx proxy_pass: IPv6 in brackets."""
    return f"[{host}]" if ":" in host else host


def _listen(text: str) -> str:
    """nginx's `listen`: PORT, HOST:PORT or [IPv6]:PORT."""
    if valid_port(text):
        return ""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            return "brackets are only for an IPv6 address"
    elif ":" in host:
        return "write an IPv6 address in brackets, like [::1]:80"
    if sep and valid_port(port) and valid_host(host):
        return ""
    return "expected PORT or HOST:PORT, like 80 or 127.0.0.1:8080"


def _path(text: str) -> str:
    if not _PATH.match(text):
        return "expected an absolute folder of letters, digits and . _ / @ + , = ~ -"
    if "/../" in f"{text}/" or "/./" in f"{text}/" or "//" in text:
        return "expected a normalised absolute folder (no '..', '.' or '//')"
    return ""


def _command(text: str) -> str:
    if not text.strip():
        return "expected a command"
    if len(text) > MAX_COMMAND:
        return f"longer than {MAX_COMMAND} characters"
    if not text.isprintable():
        return "a command on one line, without control characters"
    return ""


def _host(text: str) -> str:
    return "" if valid_host(text) else "expected an IP address or a host name (RFC 1123)"


def _port(text: str) -> str:
    return "" if valid_port(text) else "expected a port number, 1 to 65535"


# Every setting an agent may state, and how it is checked. `address` is listed so that a hello
# carrying one is checked like the rest, though the controller never takes it from a hello.
CHECKS = {
    "address": _host,
    "mysql.host": _host, "mysql.port": _port, "mysql.admin": _command, "mysql.dump": _command,
    "mysql.backups": _path,
    "redis.host": _host, "redis.port": _port, "redis.admin": _command, "redis.server": _path,
    "nginx.conf_dir": _path, "nginx.listen": _listen, "nginx.test": _command, "nginx.reload": _command,
    "nginx.pid": _path, "nginx.tls_listen": _listen,
}


def check_setting(key: str, value: str) -> str:
    """Why `key: value` is not an acceptable setting, or '' if it is."""
    check = CHECKS.get(key)
    if check is None:
        return f"unknown setting (known: {', '.join(sorted(CHECKS))})"
    return check(value)


def check_provides(names) -> str:
    """Why a list of capabilities to grant is not acceptable, or ''."""
    for name in names:
        if name not in PROVIDES:
            return f"unknown capability {str(name)[:40]!r} (known: {', '.join(PROVIDES)})"
    return ""
