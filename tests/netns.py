"""Test hosts with addresses of their own: each a network namespace joined to a bridge in the
root namespace by a veth pair, so traffic between two hosts really leaves one interface and
enters another. The controller stays in the root namespace, on the bridge's address.

Names carry the run's mark (`dpl` + 4 hex digits), so a killed run's leftovers are found and
removed (tests/sweep.py `_networks`):
    bridge   dplXXXX            10.213.N.1/24
    host i   netns dplXXXX-i    eth0 10.213.N.(i+1)/24, default route via the bridge
             veth dplXXXXvi     its end in the root namespace, on the bridge

Link faults: `cut(host)` sets the host's root-side link down (its packets go nowhere, as with a
pulled cable; its processes keep running), `mend(host)` brings it back. This kernel has no netem
qdisc and the machine no iptables or nft: latency, where a test needs it, goes through a
user-space proxy (tests/harness.py CuttableProxy)."""

from __future__ import annotations

import contextlib
import ipaddress
import random
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

PREFIX = "dpl"
SUBNETS = ipaddress.ip_network("10.213.0.0/16")


def ip(*args: str, check: bool = True) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def _taken_subnets() -> set[str]:
    out = set()
    for line in ip("-o", "-4", "addr", "show").splitlines():
        parts = line.split()
        if "inet" in parts:
            out.add(str(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network))
    return out


# The network namespace only: `ip netns exec` would also mount a /sys of its own, without the
# machine's cgroup hierarchies the agents need.
def inside(netns: str) -> list[str]:
    """The argv prefix that runs a command inside network namespace `netns` (none for "")."""
    return ["nsenter", f"--net=/run/netns/{netns}", "--"] if netns else []


@dataclass
class Host:
    name: str        # as tests call it: computing-1, router-2…
    netns: str
    address: str
    link: str        # the root namespace's end of its veth pair

    def argv(self, *command: str) -> list[str]:
        """`command` run inside the host's network namespace (see `inside`)."""
        return [*inside(self.netns), *command]

    def run(self, *command: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*command), **{"capture_output": True, "text": True, "timeout": 60, **kw})


class Network:
    """A bridge and the hosts on it; `close()` removes every namespace and link it made."""

    def __init__(self) -> None:
        self.tag = PREFIX + secrets.token_hex(2)
        taken = _taken_subnets()
        free = [n for n in SUBNETS.subnets(new_prefix=24) if str(n) not in taken and n.network_address.packed[2]]
        self.subnet = random.choice(free)
        self.gateway = str(self.subnet.network_address + 1)
        self.bridge = self.tag
        self.hosts: dict[str, Host] = {}
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add(self, name: str) -> Host:
        n = len(self.hosts) + 1
        host = Host(name, f"{self.tag}-{n}", str(self.subnet.network_address + 1 + n), f"{self.tag}v{n}")
        inner = f"{self.tag}i{n}"
        ip("netns", "add", host.netns)
        self.hosts[name] = host  # from here close() removes it
        ip("link", "add", host.link, "type", "veth", "peer", "name", inner)
        ip("link", "set", inner, "netns", host.netns)
        ip("link", "set", host.link, "master", self.bridge)
        ip("link", "set", host.link, "up")
        ip("-n", host.netns, "link", "set", inner, "name", "eth0")
        ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.netns, "link", "set", "eth0", "up")
        ip("-n", host.netns, "link", "set", "lo", "up")
        ip("-n", host.netns, "route", "add", "default", "via", self.gateway)
        return host

    def cut(self, host: Host) -> None:
        ip("link", "set", host.link, "down")

    def mend(self, host: Host) -> None:
        ip("link", "set", host.link, "up")

    def close(self) -> None:
        with contextlib.ExitStack() as each:
            each.callback(ip, "link", "del", self.bridge, check=False)
            for host in self.hosts.values():
                each.callback(ip, "netns", "del", host.netns, check=False)
                each.callback(ip, "link", "del", host.link, check=False)


def leftovers() -> list[str]:
    """Namespaces and links of runs that were killed before they removed them (any run's: the
    sweep runs only when no other run is alive)."""
    names = [line.split()[0] for line in ip("netns", "list").splitlines() if line.startswith(PREFIX)]
    links = [line.split(":")[1].strip().split("@")[0] for line in ip("-o", "link", "show").splitlines()
             if line.split(":")[1].strip().startswith(PREFIX)]
    return names + links


def remove(name: str) -> None:
    if Path(f"/run/netns/{name}").exists():
        ip("netns", "del", name, check=False)
    else:
        ip("link", "del", name, check=False)
