"""Readings of the world, each a fact: the operation that asks an agent, and a pure `parse` of its
output. Procedures, verify, recovery and status compose them; tests feed `parse` captured
outputs (tests/data/facts.json).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from protos import deployer_pb2 as pb

MISSING = "<missing>"


@dataclass(frozen=True)
class Process:
    """One service process as the agent's driver reports it."""

    name: str
    instance: str
    alive: bool
    pid: int = 0
    rss_bytes: int | None = None
    cpu_s: float | None = None
    error: str = ""
    limits_use: dict | None = None   # the environment's group on that host (asked with a group)


class ServiceProcesses:
    """The service processes whose unit name starts with `prefix` (dead ones too, until stopped)."""

    @staticmethod
    def operation(prefix: str, group: str = "") -> pb.Operation:
        return pb.Operation(service_list=pb.ServiceListSpec(name_prefix=prefix, group=group))

    @staticmethod
    def parse(output: str, unit: str = "") -> list[Process]:
        """One JSON object per line; with `unit`, only that unit's processes."""
        found = []
        for line in output.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if unit and item.get("name") != unit:
                continue
            found.append(Process(name=item["name"], instance=item["instance"], alive=bool(item["alive"]),
                                 pid=int(item.get("pid") or 0), rss_bytes=item.get("rss_bytes"),
                                 cpu_s=item.get("cpu_s"), error=item.get("error") or "",
                                 limits_use=item.get("limits_use")))
        return found


class NginxFile:
    """An environment's nginx file on a router, byte for byte, or None where there is none."""

    @staticmethod
    def command(path: str) -> str:
        return f"cat {shlex.quote(path)} 2>/dev/null || echo '{MISSING}'"

    @staticmethod
    def parse(output: str) -> str | None:
        return None if output == f"{MISSING}\n" else output
