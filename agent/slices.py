"""Names of an environment's limits and the systemd units that carry them: the slice of an
environment and the transient scope of one command. Pure, and imported by both the cgroup
code (agent/limits.py) and the systemd driver, so neither needs the other."""

from __future__ import annotations

import re
from pathlib import Path

from protos import deployer_pb2 as pb
from common import errors

# The agent's units are runtime units: rewritten by the agent whenever it starts a process, gone at
# reboot (nothing starts on its own then; the controller decides), and never in the operator's /etc.
UNIT_DIR = Path("/run/systemd/system")
GROUP = re.compile(r"auto-[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")
LEAF = re.compile(r"[A-Za-z0-9][A-Za-z0-9@._-]{0,127}")


class LimitError(errors.Failed):
    """The limits cannot be applied; the command must not run without them. One line."""


def check_names(group: str, leaf: str = "") -> None:
    """Names come from the controller; they still never reach a path unchecked."""
    if not GROUP.fullmatch(group):
        raise LimitError(f"invalid limits group {group[:80]!r}: expected auto-[a-z0-9-]+")
    if leaf and not LEAF.fullmatch(leaf):
        raise LimitError(f"invalid process group name {leaf[:80]!r}")


def slice_name(group: str) -> str:
    """systemd reads `-` in a slice name as nesting: auto-shop-prod.slice sits in auto-shop.slice
    in auto.slice, which carry no limits of their own."""
    check_names(group)
    return f"{group}.slice"


def slice_unit(spec: pb.Limits) -> str:
    """The environment's slice: its limits, for every unit and scope placed in it."""
    lines = ["[Unit]", f"Description=limits of {spec.group} (written by the deployer agent)", "",
             "[Slice]"]
    if spec.memory_bytes:
        lines += [f"MemoryMax={spec.memory_bytes}", "MemorySwapMax=0"]
    if spec.cpu > 0:
        lines += [f"CPUQuota={round(spec.cpu * 100)}%", f"CPUWeight={max(1, min(10000, round(100 * spec.cpu)))}"]
    if spec.processes:
        lines.append(f"TasksMax={spec.processes}")
    return "\n".join(lines) + "\n"


def scope_argv(spec: pb.Limits, unit: str, argv: list[str]) -> list[str]:
    """A command of the environment run in its slice (a transient scope: same pid, same session).
    A scope cannot have a private /tmp of its own: agent/limits.py adds its launcher for that."""
    return ["systemd-run", "--scope", "--quiet", "--collect", f"--slice={slice_name(spec.group)}",
            f"--unit={unit}", "--", *argv]
