"""Host facts the agent reports in its hello and heartbeats (psutil)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import psutil

from protos import deployer_pb2 as pb


def _existing(path: Path) -> Path:
    """The services root may not exist yet: report the disk it will live on."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def gather(services_root: Path) -> pb.HostFacts:
    load1, load5, load15 = os.getloadavg()
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(_existing(services_root)))
    return pb.HostFacts(
        hostname=socket.gethostname(),
        cpus=psutil.cpu_count() or 1,
        load1=load1, load5=load5, load15=load15,
        mem_total_bytes=memory.total, mem_available_bytes=memory.available,
        disk_free_bytes=disk.free, disk_total_bytes=disk.total,
    )
