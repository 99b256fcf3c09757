"""Operations as the fleet knows them: a new operation's id, a plain command, and what an
operator sees of one in listings. Pure."""

from __future__ import annotations

import secrets
import time
from typing import Mapping, Sequence

from common.redact import sanitise
from protos import deployer_pb2 as pb


def new_op_id(now: float | None = None) -> str:
    """Sortable by creation time, unique without coordination: op-20261125T091502-3f9a1c2e."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now if now is not None else time.time()))
    return f"op-{stamp}-{secrets.token_hex(4)}"


def exec_op(op_id: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
            cwd: str = "", stdin: bytes = b"", timeout_s: float = 0.0, user: str = "",
            kill_grace_s: float = 0.0) -> pb.Operation:
    return pb.Operation(id=op_id, exec=pb.ExecSpec(
        argv=list(argv), env=dict(env or {}), cwd=cwd, stdin=stdin, timeout_s=timeout_s,
        user=user, kill_grace_s=kill_grace_s))


def summary(op: pb.Operation) -> list[str]:
    """What an operator sees of an operation in listings (never its env, file content, or the
    credentials of a URL in its command line)."""
    kind = op.WhichOneof("kind")
    if kind == "exec":
        return [sanitise(arg) for arg in op.exec.argv]
    if kind == "write_file":
        return ["write_file", op.write_file.path, oct(op.write_file.mode or 0o644)]
    return [kind or "unknown"]
