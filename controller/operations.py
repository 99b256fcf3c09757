"""Pure builders of operations: they return protobuf messages and never send anything.

Only the dispatcher sends operations; procedures compose these builders.
"""

from __future__ import annotations

import secrets
import time
from typing import Mapping, Sequence

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


def write_file_op(op_id: str, path: str, content: bytes, *, mode: int = 0o644,
                  owner: str = "") -> pb.Operation:
    return pb.Operation(id=op_id, write_file=pb.WriteFileSpec(
        path=path, content=content, mode=mode, owner=owner))


def summary(op: pb.Operation) -> list[str]:
    """What an operator sees of an operation in listings (never its env or file content)."""
    kind = op.WhichOneof("kind")
    if kind == "exec":
        return list(op.exec.argv)
    if kind == "write_file":
        return ["write_file", op.write_file.path, oct(op.write_file.mode or 0o644)]
    return [kind or "unknown"]
