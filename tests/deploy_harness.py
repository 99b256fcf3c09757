"""Real parts for deploy tests: a private nginx, git repositories of the example, clean-up of
everything a test environment created in MariaDB and Redis."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.harness import ROOT, Cluster, free_port, wait_for
from tests.netns import inside

EXAMPLE = ROOT / "examples" / "shop"
# Where an agent of this machine finds MariaDB and Redis, as its `provides` settings say.
LOCAL_DATA = {"mysql.host": "127.0.0.1", "mysql.port": "3306", "redis.host": "127.0.0.1", "redis.port": "6379",
              "redis.server": shutil.which("redis-server") or "/usr/bin/redis-server"}


class Nginx:
    """An nginx of the test's own (prefix, config and port), reloaded like a real one."""

    def __init__(self, base: Path, netns: str = "", name: str = "nginx") -> None:
        self.netns = netns  # started in this network namespace (a router host: tests/netns.py)
        self.prefix = base / name
        self.conf_dir = self.prefix / "conf.d"
        self.conf = self.prefix / "nginx.conf"
        # A router host of its own has its own ports: the usual ones, where an ACME server asks.
        self.port = 80 if netns else free_port()
        self.tls_port = 443 if netns else free_port()  # where an environment with `tls:` is served over HTTPS
        for sub in ("conf.d", "logs", "tmp"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.prefix / "tmp", 0o1777)
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.conf.write_text(f"""{user}worker_processes 1;
pid {self.prefix}/nginx.pid;
error_log {self.prefix}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    # Which server block and upstream answered each request: what a switch test shows when an
    # answer came from the wrong place.
    log_format routed '$msec $host $server_name $upstream_addr $status';
    access_log {self.prefix}/logs/access.log routed;
    client_body_temp_path {self.prefix}/tmp/body;
    proxy_temp_path {self.prefix}/tmp/proxy;
    fastcgi_temp_path {self.prefix}/tmp/fastcgi;
    uwsgi_temp_path {self.prefix}/tmp/uwsgi;
    scgi_temp_path {self.prefix}/tmp/scgi;
    include {self.conf_dir}/*.conf;
}}
""")
        self.base_cmd = f"nginx -p {self.prefix} -c {self.conf}"

    def settings(self) -> dict[str, str]:
        return {"nginx.conf_dir": str(self.conf_dir), "nginx.listen": str(self.port),
                "nginx.test": f"{self.base_cmd} -t", "nginx.reload": f"{self.base_cmd} -s reload",
                "nginx.pid": str(self.prefix / "nginx.pid"), "nginx.tls_listen": str(self.tls_port)}

    def start(self) -> "Nginx":
        subprocess.run(inside(self.netns) + self.base_cmd.split(), check=True)
        wait_for(lambda: (self.prefix / "nginx.pid").exists(), what="nginx started")
        return self

    def routed(self, host: str) -> dict[tuple[str, str], int]:
        """(server block, upstream) → requests, for requests with Host `host`."""
        import collections
        seen: collections.Counter = collections.Counter()
        log = self.prefix / "logs" / "access.log"
        for line in (log.read_text(errors="replace").splitlines() if log.exists() else ()):
            parts = line.split()
            if len(parts) >= 5 and parts[1] == host:
                seen[(parts[2], parts[3])] += 1
        return dict(seen)

    def stop(self) -> None:
        pid_file = self.prefix / "nginx.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGQUIT)
            except (ProcessLookupError, ValueError):
                pass


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def new_repo(repo: Path, files: dict[str, str], message: str = "v1") -> Path:
    """A git repository at `repo` holding `files` (name → text) in one commit on branch main."""
    repo.mkdir()
    for name, text in files.items():
        (repo / name).write_text(text)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return repo


def example_repo(base: Path) -> Path:
    """A git repository holding the example's web and worker, on branch main."""
    repo = base / "shop-repo"
    repo.mkdir()
    for part in ("web", "worker"):
        shutil.copytree(EXAMPLE / part, repo / part, ignore=shutil.ignore_patterns("node_modules", "dist"))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "shop v1")
    return repo


def new_commit(repo: Path, note: str) -> str:
    (repo / "web" / "CHANGES").write_text(note + "\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", note)
    return git(repo, "rev-parse", "HEAD")


def service_users_base(prefix: str = "deployer-deploy-") -> Path:
    """A temporary folder for a deploy cluster that services' own users can pass through (pytest's
    folders are private to root); only root can list it. The caller removes it."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o711)
    return base


def unique_env() -> str:
    return "t" + secrets.token_hex(3)


def mysql(sql: str) -> str:
    return subprocess.run(["mariadb", "--batch", "--skip-column-names", "-e", sql], check=True,
                          capture_output=True, text=True).stdout


def redis(*args: str) -> str:
    return subprocess.run(["redis-cli", *args], check=True, capture_output=True, text=True).stdout


def purge(app: str, env: str) -> None:
    """Remove what a test environment created in MariaDB, Redis and the system's users (names are
    ours: auto-*). Its processes must have ended."""
    from controller.environments.naming import unix_user
    user = unix_user(app, env)
    if subprocess.run(["id", "-u", user], capture_output=True).returncode == 0:
        wait_for(lambda: subprocess.run(["pgrep", "-u", user], capture_output=True).returncode == 1, 10,
                 what=f"the processes of {user} ended")
        subprocess.run(["userdel", user], check=True, capture_output=True)
    remove_limits_group(user)
    purge_names(f"auto-{app}-{env}-")


def purge_names(prefix: str) -> None:
    """Every database, MariaDB user, Redis ACL user and key, and snapshot folder, whose name starts
    with `prefix`."""
    for db in mysql(f"SHOW DATABASES LIKE '{prefix}%'").split():
        mysql(f"DROP DATABASE `{db}`")
    for user in mysql(f"SELECT User FROM mysql.user WHERE User LIKE '{prefix}%'").split():
        mysql(f"DROP USER '{user}'@'%'")
    for user in redis("ACL", "USERS").split():
        if user.startswith(prefix):
            redis("ACL", "DELUSER", user)
    keys = redis("--scan", "--pattern", f"{prefix}*").split()
    if keys:
        redis("DEL", *keys)
    import glob  # the snapshots taken before migrates (controller/environments/backups.py)
    for folder in glob.glob(f"/var/backups/deployer/{glob.escape(prefix)}*"):
        shutil.rmtree(folder, ignore_errors=True)


def purge_each(app: str, envs: list[str]) -> None:
    """Purge each environment (of `app`, or `APP/ENV` for another app) in a clean-up of its own, so
    one that fails leaves the others purged all the same (their processes must have ended)."""
    with contextlib.ExitStack() as each:
        for env in envs:
            each.callback(purge, *(env.split("/", 1) if "/" in env else (app, env)))


def remove_limits_group(group: str) -> None:
    """The environment's cgroups (agent/limits.py), leaves first; their processes must have ended."""
    import glob
    for folder in glob.glob(f"/sys/fs/cgroup/*/deployer/{group}") + glob.glob(f"/sys/fs/cgroup/deployer/{group}"):
        for leaf in sorted(Path(folder).iterdir(), reverse=True):
            if leaf.is_dir():
                leaf.rmdir()
        Path(folder).rmdir()


def http_get(port: int, path: str = "/", host: str = "", timeout: float = 5.0,
             address: str = "127.0.0.1") -> tuple[int, bytes]:
    import http.client
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_http_ok(port: int, path: str, host: str, timeout: float = 30) -> None:
    def ok():
        try:
            return http_get(port, path, host)[0] == 200
        except OSError:
            return False
    wait_for(ok, timeout, every=0.2, what=f"http://127.0.0.1:{port}{path} answering 200")


def served_from(port: int, host: str) -> str:
    """The folder of the process that answered `host`'s `/version` (the example app says)."""
    import json
    status, body = http_get(port, "/version", host)
    return json.loads(body).get("cwd", "") if status == 200 else f"HTTP {status}"


def elapsed(start: float) -> float:
    return time.monotonic() - start


def deploy_cluster(base: Path, cleanup: contextlib.ExitStack | None = None) -> tuple[Nginx, Cluster]:
    """A private nginx, a controller, `computing-1` (which also provides MySQL, Redis and nginx
    routing on this machine) and `daemons-1`, all connected.

    What it starts is stopped by `cleanup` when given (registered as soon as it runs), and in any
    case if the set-up itself fails half-way."""
    for folder in (base, *base.parents):
        if not folder.stat().st_mode & 0o001:
            raise AssertionError(f"{folder} is closed to other users, so services' own users could not reach "
                                 f"{base}/srv: use service_users_base()")
    with contextlib.ExitStack() as started:
        nginx = Nginx(base)
        started.callback(nginx.stop)
        nginx.start()
        cluster = Cluster(base)
        started.callback(cluster.close)
        cluster.controller.start()
        provides = {**nginx.settings(), **LOCAL_DATA}
        cluster.add_agent("computing-1", ["computing"], provides=provides)
        cluster.add_agent("daemons-1", ["daemons"])
        cluster.wait_connected("computing-1", "daemons-1")
        if cleanup is not None:
            cleanup.push(started.pop_all())
        else:
            started.pop_all()
    return nginx, cluster


@contextlib.contextmanager
def deploy_world(prefix: str, app: str):
    """A module's world of deploys: a base folder, a private nginx, a controller and its agents,
    and the list of environments to purge (of `app`). Each clean-up is registered as soon as there
    is something to clean, and each runs even if an earlier one failed."""
    with contextlib.ExitStack() as cleanup:
        base = service_users_base(prefix)
        cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        envs: list[str] = []
        cleanup.callback(purge_each, app, envs)
        nginx, cluster = deploy_cluster(base, cleanup)
        yield {"base": base, "nginx": nginx, "cluster": cluster, "envs": envs}
