"""The agent's link to the controller: channel settings, reconnect backoff, error classes."""

from __future__ import annotations

import random

import grpc
from common import errors

# Keepalive must agree with the controller's server settings: a client pinging more often than
# the server's `min_ping_interval_without_data_ms` (10 s there) is answered GOAWAY too_many_pings.
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
MAX_MESSAGE_BYTES = 8 << 20

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # gRPC core ends a link on an unanswered ping only after this (60 s by default; it does not
    # apply keepalive_timeout_ms): without it a silent link goes unnoticed for over a minute.
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # We do our own jittered backoff between sessions; keep gRPC's own reconnect quick.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.enable_retries", 0),
]

# Errors that no retry can fix: the controller does not accept us, or does not speak our protocol.
FATAL = frozenset({
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INVALID_ARGUMENT,
})

# Windows of 1, 2, 4, 8, 16 s. The first (also the one after a goodbye) is quick, and wide enough
# that a fleet does not come back in one burst; the cap means that however long the controller was
# away, every agent dials again within 16 s of its return, so a fleet is back within 30 s.
INITIAL_BACKOFF_S = 1.0
MAX_DOUBLINGS = 4


class FatalLinkError(errors.Refused):
    """The controller refused the agent for good (bad identity, protocol mismatch)."""


def is_fatal(code: grpc.StatusCode) -> bool:
    return code in FATAL


def backoff_delay(attempts: int, rng: random.Random | None = None) -> float:
    """A random delay within a window that doubles with each failed attempt (capped).

    Full jitter spreads a fleet out: when a controller restarts, a hundred agents that lost it at
    the same instant must not all dial back at the same instant.
    """
    window = INITIAL_BACKOFF_S * (1 << min(attempts, MAX_DOUBLINGS))
    return (rng or random).uniform(window / 4, window)

