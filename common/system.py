"""Process-level glue shared by the agent and the controller: systemd notification, malloc tuning.

(The controller may import this module; the agent never imports the controller.)
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import sys
from typing import TextIO

import structlog

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(state.encode())


def tune_malloc() -> None:
    """Keep freed megabyte-sized buffers in the heap instead of returning them to the kernel.

    Output moves in 1 MiB pieces; by default glibc serves each from a fresh mmap and unmaps it
    when freed, so every piece costs hundreds of page faults. Measured on a 1 GiB stream, this
    tuning cut the CLI's system time by more than half. Memory stays bounded: the same few
    buffers are reused. A no-op outside glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 4 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 16 << 20)
    except (OSError, AttributeError):
        pass


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """JSON logs with stable event names (`agent.connected`, `op.finished`, …), one per line."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
