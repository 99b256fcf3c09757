"""A fleet of test hosts (tests/netns.py): routers with an nginx each, computing hosts, and a data
host whose MariaDB and Redis listen on its own address, each with an agent of its own; the
controller in the root namespace, on the bridge. Nothing reaches the outside from a host, so the
example's dependencies come from an npm cache the harness fills first (from the root namespace)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from tests.deploy_harness import EXAMPLE, Nginx, purge_each, service_users_base
from tests.harness import Cluster, wait_for
from tests.netns import Host, Network


class DataHost:
    """MariaDB and Redis of the host's own, listening on its address (port 3306 and 6379)."""

    def __init__(self, base: Path, host: Host) -> None:
        self.host = host
        self.folder = base / f"data-{host.name}"
        self.socket = self.folder / "mysqld.sock"
        self.procs: list[subprocess.Popen] = []

    def start(self) -> "DataHost":
        data = self.folder / "mysql"
        self.folder.mkdir(parents=True)
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root", "--skip-test-db",
                        "--auth-root-authentication-method=socket"], check=True, capture_output=True, timeout=120)
        log = open(self.folder / "mysqld.log", "ab")
        self.procs.append(subprocess.Popen(self.host.argv(
            "mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={self.socket}",
            f"--pid-file={self.folder}/mysqld.pid", f"--bind-address={self.host.address}", "--port=3306",
            "--user=root", "--skip-log-bin", "--innodb-buffer-pool-size=64M", "--max-connections=500",
            "--skip-name-resolve",  # no DNS on a test host: a reverse lookup would stall every connection
            f"--log-error={self.folder}/mysqld.err"), stdout=log, stderr=log))
        self.procs.append(subprocess.Popen(self.host.argv(
            "redis-server", "--bind", self.host.address, "--port", "6379", "--save", "", "--appendonly", "no",
            "--protected-mode", "no",  # reached from the other hosts; verify warns of its open default user
            "--dir", str(self.folder)), stdout=log, stderr=log))
        wait_for(lambda: self.sql("SELECT 1").strip() == "1", 60, every=0.3, what=f"MariaDB on {self.host.name}")
        wait_for(lambda: self.redis("PING").strip() == "PONG", 30, every=0.2, what=f"Redis on {self.host.name}")
        return self

    def settings(self) -> dict[str, str]:
        """What its agent is configured to provide (the services reach both over the network)."""
        return {"mysql.host": self.host.address, "mysql.port": "3306",
                "mysql.admin": f"mariadb --batch --socket={self.socket}",
                "mysql.dump": f"mariadb-dump --socket={self.socket}", "mysql.backups": str(self.folder / "backups"),
                "redis.host": self.host.address, "redis.port": "6379",
                "redis.server": shutil.which("redis-server") or "/usr/bin/redis-server"}

    def sql(self, query: str) -> str:
        result = subprocess.run(["mariadb", "--batch", "--skip-column-names", f"--socket={self.socket}", "-e", query],
                                capture_output=True, text=True, timeout=30)
        return result.stdout if result.returncode == 0 else ""

    def redis(self, *args: str) -> str:
        result = subprocess.run(["redis-cli", "-h", self.host.address, "-p", "6379", *args], capture_output=True,
                                text=True, timeout=30)
        return result.stdout

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def npm_cache(base: Path) -> Path:
    """An npm cache holding the example web's dependencies, filled from the root namespace (the
    hosts have no way out); the services' users install from it with --offline."""
    cache, scratch = base / "npm-cache", base / "npm-scratch"
    shutil.copytree(EXAMPLE / "web", scratch, ignore=shutil.ignore_patterns("node_modules", "dist"))
    subprocess.run(["npm", "ci", "--omit=dev", "--no-audit", "--no-fund", "--prefer-offline", "--cache", str(cache)],
                   cwd=scratch, check=True, capture_output=True, timeout=600)
    shutil.rmtree(scratch)
    # Each service's user writes its logs and index entries there: a test's own cache, open to all.
    subprocess.run(["chmod", "-R", "a+rwX", str(cache)], check=True)
    return cache


class Fleet:
    """The hosts, their agents, and what runs on them; `close()` stops it all and removes the network."""

    def __init__(self, base: Path, cleanup: contextlib.ExitStack, lost_after: float = 60.0,
                 controller_args: tuple[str, ...] = ()) -> None:
        self.base = base
        self.net = Network()
        cleanup.callback(self.net.close)
        self.cluster = Cluster(base, lost_after=lost_after, host=self.net.gateway)
        self.cluster.controller.extra_args += tuple(controller_args)
        cleanup.callback(self.cluster.close)
        self.routers: dict[str, Nginx] = {}
        self.data: dict[str, DataHost] = {}
        self.cleanup = cleanup

    def host(self, name: str) -> Host:
        return self.net.hosts[name]

    def add_router(self, name: str) -> Nginx:
        host = self.net.add(name)
        nginx = Nginx(self.base, netns=host.netns, name=f"nginx-{name}")
        self.cleanup.callback(nginx.stop)
        nginx.start()
        self.routers[name] = nginx
        self._agent(name, ["routing"], nginx.settings())
        return nginx

    def add_computing(self, name: str) -> None:
        self.net.add(name)
        self._agent(name, ["computing"], {})

    def add_data(self, name: str) -> DataHost:
        host = self.net.add(name)
        data = DataHost(self.base, host)
        self.cleanup.callback(data.stop)
        data.start()
        self.data[name] = data
        self._agent(name, ["daemons"], data.settings())
        return data

    def _agent(self, name: str, roles: list[str], provides: dict[str, str]) -> None:
        host = self.host(name)
        root = self.base / "hosts" / name / "srv"
        root.mkdir(parents=True)
        self.cluster.add_agent(name, roles, provides=provides, netns=host.netns, services_root=root)

    def start(self) -> "Fleet":
        self.cluster.controller.start()
        return self

    def get(self, router: str, path: str, host: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """A request from the root namespace to a router, across the bridge."""
        from tests.deploy_harness import http_get
        return http_get(self.routers[router].port, path, host=host, timeout=timeout,
                        address=self.host(router).address)


@contextlib.contextmanager
def fleet_world(prefix: str, app: str, routers: int = 1, computing: int = 2, lost_after: float = 60.0,
                controller_args=lambda base: ()):
    """A module's fleet: `routers` routers, `computing` computing hosts and one data host
    (`daemons-1`, with MariaDB and Redis), every agent connected; and the list of environments
    whose users and groups are removed at the end (of `app`). `controller_args(base)` are the
    controller's extra arguments (a settings file made in the world's folder, say)."""
    if os.geteuid() != 0:
        raise AssertionError("network namespaces need root")
    with contextlib.ExitStack() as cleanup:
        base = service_users_base(prefix)
        cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        envs: list[str] = []
        cleanup.callback(purge_each, app, envs)
        cache = npm_cache(base)
        fleet = Fleet(base, cleanup, lost_after, controller_args(base)).start()
        for n in range(1, routers + 1):
            fleet.add_router(f"router-{n}")
        for n in range(1, computing + 1):
            fleet.add_computing(f"computing-{n}")
        fleet.add_data("daemons-1")
        fleet.cluster.wait_connected(*fleet.net.hosts, timeout=60)
        yield {"base": base, "fleet": fleet, "cluster": fleet.cluster, "envs": envs, "npm_cache": cache}
