"""Verify, repair and clean: compare the ledger with what is really there, then converge.

Facts are gathered with a few operations per host; `findings` compares them with the ledger and
is pure. Repair only converges (restarts a dead instance, rewrites a route, recreates an ACL or
database user with its recorded name and password) and never deletes data. Clean removes failed
instances, code instances beyond the kept number, and orphans inside our namespaces — `auto-*`
names that no environment in the ledger claims — and nothing else.

One module, though a little long: gathering facts, judging them and acting on the findings share
the Facts and Finding types and are read together when a finding is added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protos import deployer_pb2 as pb

from controller.environments.facts import (HostFolders, MysqlNames, RedisAcl, Releases, RouteFiles,
                                          ServiceProcesses)
from controller.environments import naming, commands as ops, ownership
from controller.state.knowledge import Scope
from controller.environments import planner
from controller.environments.planner import Change, ServicePlan
from controller.environments import data, deploying, routing
from controller.environments.context import JobContext, PlacementError, StepFailed, output_of, pick_agent
from controller.environments.deploying import KEEP_RELEASES
from controller.environments.spec import REDIS_MAXMEMORY
from controller.state.ledger import RAN, Status


@dataclass(frozen=True)
class Finding:
    """One difference between the ledger and reality, said in one line."""

    where: str          # shop/prod/web, or a host for orphans
    what: str
    fix: str            # "restart", "checkout", "route", "redis-user", "redis-server", "mysql-user", "env-mode",
    #                     "orphan", "" (manual)
    service: str = ""
    target: str = ""    # what the fix acts on (an orphan's path, a user name…)

    def line(self) -> str:
        advice = {"restart": "repair restarts it", "route": "repair rewrites it",
                  "redis-user": "repair recreates it", "mysql-user": "repair recreates it",
                  "redis-server": "repair restarts it", "checkout": "repair checks it out again from its commit",
                  "env-mode": "repair fixes it", "orphan": "clean removes it"}.get(self.fix, "needs an operator")
        return f"{self.where}: {self.what} ({advice})"


@dataclass
class Facts:
    releases: dict[str, str] = field(default_factory=dict)     # service → commit, or "missing"
    env_modes: dict[str, str] = field(default_factory=dict)    # service → "600", or "missing"
    env_owners: dict[str, str] = field(default_factory=dict)   # service → owner of its .env
    users: dict[str, bool] = field(default_factory=dict)       # host → the environment's user exists there
    processes: dict[tuple[str, str], bool] = field(default_factory=dict)  # (unit, instance) → alive
    host_processes: dict[str, dict[tuple[str, str], bool]] = field(default_factory=dict)  # host → its own listing
    health: dict[str, str] = field(default_factory=dict)       # service → "" ok, or why not
    nginx: str | None = None                                   # content, None if missing
    nginx_expected: str = ""
    folders: dict[str, list[str]] = field(default_factory=dict)  # host → auto-* folders under its root
    folder_marks: dict[str, str] = field(default_factory=dict)   # folder → its owner mark, "" if none
    databases: set[str] = field(default_factory=set)
    database_marks: dict[str, str] = field(default_factory=dict)  # database → its comment
    mysql_users: set[str] = field(default_factory=set)
    redis_users: dict[str, str] = field(default_factory=dict)  # user → its key patterns
    redis_scripting: set[str] = field(default_factory=set)     # auto-* users still allowed scripts
    redis_channels: dict[str, str] = field(default_factory=dict)  # user → its channel patterns
    redis_default_open: bool = False  # the shared Redis lets anyone in as `default` without a password
    dedicated: dict[tuple[str, int], str] = field(default_factory=dict)  # live dedicated Redis → what is wrong ('')
    nginx_files: list[str] = field(default_factory=list)      # auto-*.conf in the router's folder
    nginx_marks: dict[str, str] = field(default_factory=dict)  # auto-*.conf → its owner line
    other_routers: dict[str, tuple[str | None, str]] = field(default_factory=dict)  # id → (file, expected)
    certificates: dict[str, str | None] = field(default_factory=dict)  # router → the certificate it serves
    certificate_expected: str = ""                                     # the one in the environment's secret
    # A web service's other replicas (`replicas: N`): (service, rank from 2) → what their host shows.
    replicas: dict[tuple[str, int], "ReplicaFacts"] = field(default_factory=dict)


@dataclass
class ReplicaFacts:
    host: str
    process: str
    commit: str = ""       # its release's commit, "missing", or "" when its host could not be asked
    alive: bool = False
    health: str = ""       # "" ok, or why not


class Checker:
    """Runs inside a job: gathers facts for one environment, and repairs or cleans."""

    def __init__(self, ctx: JobContext, claimed: dict) -> None:
        self.ctx = ctx
        self.spec = ctx.spec
        self.ledger = ctx.ledger
        self.env_key = ctx.env_key
        self.claimed = claimed  # every auto-* name any environment in the ledger holds

    def unit(self, service: str) -> str:
        return naming.unit_base(self.spec.app, self.spec.environment, service)

    async def gather(self) -> Facts:
        facts = Facts()
        state = self.ledger.state(self.env_key)
        hosts = {host for live in state.values() if live.code for host in live.code.hosts}
        for host_id in sorted(hosts):
            host = self.ctx.registry.agents.get(host_id)
            if host is None or host.state != "connected":
                continue
            await self._code_facts(host, state, facts)
        router = routing.router(self.ctx, self.env_key)
        conf = routing.nginx_path(self.ctx, router)
        facts.nginx = await routing.read_file(self.ctx, router, conf, self.env_key)
        listing = await self.ctx.sh(router, RouteFiles.command(routing.conf_dir(router)), self.env_key, "list routes",
                                    check=False, scope=Scope.route(self.env_key))
        facts.nginx_marks = RouteFiles.parse(output_of(listing))
        facts.nginx_files = list(facts.nginx_marks)
        # The probe's nonce is the switch's, not the ledger's: the file is compared with it.
        facts.nginx_expected = routing.nginx_content(self.ctx, router, probe=ops.probe_of(facts.nginx)).decode()
        if routing.serves_https(self.ctx):  # the certificate each router serves (public), against ours
            for on in routing.routers(self.ctx):
                if on.state != "connected":
                    continue
                facts.certificates[on.id] = await routing.read_file(
                    self.ctx, on, routing.tls_files(self.ctx, on)[0], self.env_key, "read certificate")
            facts.certificate_expected = (routing.acme_certificate(self.ctx)[0] if self.spec.tls.auto else
                                          self.ledger.secrets(self.env_key).get(self.spec.tls.certificate, ""))
        for other in routing.routers(self.ctx):  # every router serves every route: each is looked at
            if other.id == router.id or other.state != "connected":
                continue
            content = await routing.read_file(self.ctx, other, routing.nginx_path(self.ctx, other), self.env_key)
            facts.other_routers[other.id] = (content, routing.nginx_content(
                self.ctx, other, probe=ops.probe_of(content)).decode())
        await self._data_facts(facts)
        return facts

    async def _code_facts(self, host, state, facts: Facts) -> None:
        user = self.ctx.unix_user
        probe = await self.ctx.sh(host, HostFolders.command(ownership.folder_marks_script(host.services_root), user),
                                  self.env_key, "inspect code", check=False)
        folders, user_exists = HostFolders.parse(output_of(probe))
        if folders:
            facts.folders.setdefault(host.id, []).extend(folders)
        facts.folder_marks.update(folders)
        if user_exists is not None:
            facts.users[host.id] = user_exists
        def release_of(service: str, live) -> str:
            return (f"{naming.service_dir(host.services_root, self.spec.app, self.spec.environment, service)}"
                    f"/releases/{live.code.number}")
        releases = {service: release_of(service, live)
                    for service, live in state.items() if live.code and live.code.host == host.id}
        others = {(service, rank): replica for service, live in state.items() if live.code
                  for rank, replica in enumerate(live.code.replicas[1:], start=2) if replica.host == host.id}
        releases.update({f"{service}#{rank}": release_of(service, state[service]) for service, rank in others})
        if releases and facts.users.get(host.id):
            # As the environment's user: root never runs git in a repository its user owns.
            probe = await self.ctx.sh(host, Releases.command(releases), self.env_key, "inspect releases", check=False,
                                      user=user)
            for service, found in Releases.parse(output_of(probe)).items():
                if "#" in service:  # another replica's release: its commit only (the first one's .env is checked)
                    name, _, rank = service.partition("#")
                    if (name, int(rank)) in others:
                        facts.replicas[(name, int(rank))] = ReplicaFacts(host.id, others[(name, int(rank))].process,
                                                                         found.commit)
                    continue
                if found.commit:
                    facts.releases[service] = found.commit
                if found.env_mode:
                    facts.env_modes[service] = found.env_mode
                if found.env_owner:
                    facts.env_owners[service] = found.env_owner
        listing = await self.ctx.run_op(host, ServiceProcesses.operation(naming.PREFIX),
                                           self.env_key, "list processes", check=False)
        here = facts.host_processes.setdefault(host.id, {})
        for process in ServiceProcesses.parse(output_of(listing)):
            facts.processes[(process.name, process.instance)] = process.alive
            here[(process.name, process.instance)] = process.alive
        address = host.address
        for (service, rank), replica in others.items():  # each replica by its host's own listing
            seen = facts.replicas.setdefault((service, rank), ReplicaFacts(host.id, replica.process))
            seen.alive = here.get((self.ctx.unit(service), replica.process), False)
            definition = next((s for s in self.spec.services if s.name == service), None)
            if seen.alive and replica.port and definition and definition.is_web:
                probe = await self.ctx.run_op(host, pb.Operation(http_probe=pb.HttpProbeSpec(
                    url=f"http://{ops.url_host(address)}:{replica.port}{definition.health}", attempts=2,
                    interval_s=0.5, timeout_s=2.0)), service, "health", check=False)
                seen.health = probe.result.error if probe.result.exit_code else ""
        for service, live in state.items():
            definition = self.spec.service(service) if service in {s.name for s in self.spec.services} else None
            if live.code and live.code.host == host.id and live.code.port and definition and definition.is_web:
                probe = await self.ctx.run_op(host, pb.Operation(http_probe=pb.HttpProbeSpec(
                    url=f"http://{ops.url_host(address)}:{live.code.port}{definition.health}", attempts=2, interval_s=0.5,
                    timeout_s=2.0)), service, "health", check=False)
                facts.health[service] = probe.result.error if probe.result.exit_code else ""

    def _provider(self, capability: str):
        try:
            return pick_agent(self.ctx.registry, capability=capability)
        except PlacementError:
            return None

    def _data_hosts(self, component: str) -> list:
        """The connected agents holding this environment's live instances of `component` (the
        ledger says where each is), and the first provider, which would take a new one."""
        recorded = {r.host for r in self.ledger.instances(self.env_key, status=Status.LIVE)
                    if r.component == component and r.host and r.names.get("mode") != "dedicated"}
        found = [a for a in (self.ctx.registry.agents.get(h) for h in sorted(recorded))
                 if a is not None and a.state == "connected"]
        first = self._provider(component)
        return found + ([first] if first is not None and first not in found else [])

    async def _data_facts(self, facts: Facts) -> None:
        for mysql in self._data_hosts("mysql"):
            op = await self.ctx.sh(mysql, MysqlNames.command(mysql.mysql_admin()), self.env_key, "inspect mysql",
                                   check=False, scope=Scope.data(self.env_key))
            databases, users = MysqlNames.parse(output_of(op))
            facts.databases |= set(databases)
            facts.database_marks.update(databases)
            facts.mysql_users |= users
        for redis in self._data_hosts("redis"):
            op = await self.ctx.sh(redis, RedisAcl.command(redis.redis_cli()), self.env_key, "inspect redis",
                                   check=False, scope=Scope.data(self.env_key))
            read_acl_list(output_of(op), facts)
        for r in self.ledger.instances(self.env_key, status=Status.LIVE):
            if r.component == "redis" and r.names.get("mode") == "dedicated":
                facts.dedicated[(r.service, r.number)] = await self._dedicated_facts(r)

    async def _dedicated_facts(self, r) -> str:
        """What is wrong with a live dedicated Redis ('' if nothing): not running, not answering."""
        host = self.ctx.registry.agents.get(r.host)
        if host is None or host.state != "connected":
            return f"cannot be checked: agent {r.host} is not connected"
        unit = self.ctx.unit_of_redis(r.service)
        listing = await self.ctx.run_op(host, ServiceProcesses.operation(unit), r.service, "list redis", check=False)
        if not any(p.instance == str(r.number) and p.alive for p in ServiceProcesses.parse(output_of(listing), unit)):
            return f"is not running on {r.host}"
        password = self.ledger.password(self.env_key, r.service, "redis", r.number) or ""
        ping = await self.ctx.sh(host, ops.redis_server_ready(r.names["bind"], r.names["port"], 2), r.service,
                                 "ping redis", check=False, stdin=password.encode(), user=self.ctx.unix_user,
                                 scope=Scope.data(self.env_key, (r.service, "redis", r.number)))
        return "" if ping.result.exit_code == 0 else f"does not answer on {r.host}: {output_of(ping).strip()[-200:]}"

    def findings(self, facts: Facts) -> list[Finding]:
        return findings(self.env_key, self.spec, self.ledger, facts, self.claimed,
                        self.unit, self.ctx.registry)

    def warnings(self, facts: Facts) -> list[str]:
        return warnings(facts)

    def foreign(self, facts: Facts) -> list[str]:
        return foreign(self.spec, self.ledger.owner, facts, self.claimed)

    # ---------------------------------------------------------------- repair and clean

    async def repair(self, found: list[Finding]) -> list[str]:
        """Users and file modes first (a restarted process needs them), then processes, then routes."""
        done = []
        for f in found:
            if f.fix == "redis-server":
                await self._restart_redis(f)
                done.append(f"{f.where}: restarted its dedicated Redis {f.target}")
            elif f.fix == "redis-user":
                await self._recreate(f, "redis")
                done.append(f"{f.where}: recreated Redis ACL user {f.target}")
            elif f.fix == "mysql-user":
                await self._recreate(f, "mysql")
                done.append(f"{f.where}: recreated MariaDB user {f.target}")
            elif f.fix == "env-mode":
                live = self.ledger.state(self.env_key)[f.service].code
                host = self.ctx.registry.agents[live.host]
                path = f"{naming.service_dir(host.services_root, self.spec.app, self.spec.environment, f.service)}" \
                       f"/releases/{live.number}/.env"
                # As its owner: a root chmod would follow a link the user put in its place.
                await self.ctx.sh(host, ops.env_mode_private(path), f.service, "repair .env",
                                     user=self.ctx.unix_user)
                done.append(f"{f.where}: .env mode set to 600")
        restart = sorted({f.service for f in found if f.fix in ("restart", "checkout")})
        for service in restart:
            await self._restart(service)  # a missing release is checked out and installed again on the way
            again = next((f for f in found if f.fix == "checkout" and f.service == service), None)
            done.append(f"{self.env_key}/{service}: " + (f"checked out {again.target[:12]} again, installed, built and "
                                                         "restarted its live code instance" if again else
                                                         "restarted its live code instance"))
        if any(f.fix == "route" for f in found) and not restart:  # a restart rewrites the route anyway
            await routing.switch_route(self.ctx, self.env_key)
            done.append(f"{self.env_key}: rewrote the nginx route")
        return done

    async def _restart(self, service: str) -> None:
        state = self.ledger.state(self.env_key)
        live = state[service]
        changes = [Change("code", False, live.code.number, "repair")]
        changes += planner.kept_data(self.ctx.spec.service(service), state)
        await deploying.deploy(self.ctx, ServicePlan(service, "deploy", tuple(changes), live.code.commit, ("repair",)))

    async def _restart_redis(self, f: Finding) -> None:
        number = int(f.target)
        row = self.ledger.instance(self.env_key, f.service, "redis", number)
        password = self.ledger.password(self.env_key, f.service, "redis", number) or ""
        await data.stop_redis_server(self.ctx, self.ctx.registry.agents[row.host], f.service, number, "stop redis")
        await data.ensure_redis_server(self.ctx, self.ctx.registry.agents[row.host], f.service, number, row.names,
                                       password, row.names.get("maxmemory") or REDIS_MAXMEMORY, settle=False)

    async def _recreate(self, f: Finding, component: str) -> None:
        live = self.ledger.state(self.env_key)[f.service].live(component)
        row = self.ledger.instance(self.env_key, f.service, component, live.number)
        names = row.names
        password = self.ledger.password(self.env_key, f.service, component, live.number) or ""
        provider = self.ctx.registry.agents[row.host]
        sets = Scope.data(self.env_key, (f.service, component, live.number))
        if component == "redis":
            refused = await self.ctx.guarded(
                provider, ownership.redis_reset_owned(provider.redis_cli(), names["user"]) + ops.redis_admin(provider.redis_cli()),
                f.service, "repair redis", scope=sets,
                stdin=ownership.redis_drop_stdin(password) + ops.redis_create_user(names["user"], names["prefix"], password))
            if refused:
                raise StepFailed(f.service, "repair redis", refused)
        else:
            await self.ctx.sh(provider, provider.mysql_admin(), f.service,
                                 "repair mysql", stdin=ops.mysql_user(names["database"], names["user"], password,
                                                      self.ctx.spec.limits.mysql_connections),
                                 scope=sets)

    async def clean(self, facts: Facts, dry_run: bool) -> list[str]:
        """Orphan folders inside the services roots, failed releases, releases beyond the kept number."""
        plan: list[tuple[object, str]] = []
        for host_id, folders in facts.folders.items():
            host = self.ctx.registry.agents[host_id]
            for folder in folders:
                if folder.rsplit("/", 1)[-1] not in self.claimed["folders"] and \
                        _ours(facts.folder_marks.get(folder, ""), self.ledger.owner):
                    plan.append((host, folder))
        state = self.ledger.state(self.env_key)
        for service, live in state.items():
            if not live.code:
                continue
            host = self.ctx.registry.agents.get(live.code.host)
            if host is None:
                continue
            rows = [r for r in self.ledger.instances(self.env_key, service) if r.component == "code"]
            kept = sorted(r.number for r in rows if r.status in RAN)[-KEEP_RELEASES:]
            base = naming.service_dir(host.services_root, self.spec.app, self.spec.environment, service)
            for r in rows:
                if r.status not in (Status.REMOVED, Status.TAKEN) and r.number not in kept and r.number != live.code.number:
                    plan.append((host, f"{base}/releases/{r.number}"))
        lines = [f"{host.id}: remove {path}" for host, path in plan]
        if dry_run or not plan:
            return lines
        for host, path in plan:
            if "/releases/" in path:  # inside a service folder of ours: a release the ledger made
                await self.ctx.sh(host, ops.remove_paths(path), self.env_key, "clean")
            else:  # the mark is read again right before: it was read when facts were gathered
                await self.ctx.sh(host, ownership.if_folder_ours(path, self.ledger.owner, 'rm -rf -- "$d"'),
                                     self.env_key, "clean")
        for service, live in state.items():
            for r in self.ledger.instances(self.env_key, service):
                if r.component == "code" and r.status in (Status.FAILED, Status.STANDBY) and any(
                        p.endswith(f"/releases/{r.number}") and f"/{naming.unit_base(self.spec.app, self.spec.environment, service)}/" in p
                        for _, p in plan):
                    self.ledger.set_status(self.env_key, service, "code", r.number, Status.REMOVED)
        return lines


def findings(env_key, spec, ledger, facts: Facts, claimed, unit, registry) -> list[Finding]:
    """Pure: every difference between the ledger and the facts, one finding each."""
    out: list[Finding] = []
    state = ledger.state(env_key)
    user = naming.unix_user(spec.app, spec.environment)
    for service, live in sorted(state.items()):
        where = f"{env_key}/{service}"
        code = live.code
        if code is not None:
            out += _code_findings(env_key, service, where, code, ledger, facts, user, unit, registry)
        if live.mysql is not None:
            out += _mysql_findings(env_key, service, where, live.mysql, ledger, facts)
        if live.redis is not None:
            out += _redis_findings(env_key, spec, service, where, live.redis, ledger, facts)
    out += _route_findings(env_key, spec, facts)
    out += _orphan_findings(env_key, spec, ledger, facts, claimed, unit)
    return out


def _code_findings(env_key, service, where, code, ledger, facts: Facts, user, unit, registry) -> list[Finding]:
    """The live code instance: its agent and Unix user, its release, its .env, its process and health."""
    out: list[Finding] = []
    host = registry.agents.get(code.host)
    if host is None or host.state != "connected":
        out.append(Finding(where, f"code {code.number}: agent {code.host} is not connected, cannot check", ""))
    elif facts.users.get(code.host) is False:
        out.append(Finding(where, f"code {code.number}: Unix user {user} is missing on {code.host}",
                           "restart", service, user))
    else:
        commit = facts.releases.get(service)
        if commit == "missing":  # code comes back by itself, from the commit the ledger recorded
            out.append(Finding(where, f"code {code.number}: release folder is missing", "checkout", service,
                               code.commit))
        elif commit and commit != code.commit:
            out.append(Finding(where, f"code {code.number}: release is at {commit[:12]}, not {code.commit[:12]}",
                               "", service))
        mode = facts.env_modes.get(service)
        owner = facts.env_owners.get(service)
        if mode == "missing" and commit != "missing":
            out.append(Finding(where, f"code {code.number}: .env is missing", "restart", service))
        elif owner and owner != user:
            out.append(Finding(where, f"code {code.number}: .env belongs to {owner}, not {user}", "restart",
                               service))
        elif mode and mode not in ("600", "missing"):
            out.append(Finding(where, f"code {code.number}: .env has mode {mode}, not 600", "env-mode", service))
        row = ledger.instance(env_key, service, "code", code.number)
        process = row.names.get("process", "") if row else ""
        listed = facts.host_processes.get(code.host, facts.processes)  # replicas elsewhere may share a name
        if process and not listed.get((unit(service), process), False):
            out.append(Finding(where, f"code {code.number}: process {process} is not running", "restart", service))
        elif facts.health.get(service):
            out.append(Finding(where, f"code {code.number}: health check fails: {facts.health[service]}",
                               "restart", service))
    for rank, replica in enumerate(code.replicas[1:], start=2):
        out += _replica_findings(where, service, code, rank, replica, facts, registry)
    return out


def _replica_findings(where, service, code, rank, replica, facts: Facts, registry) -> list[Finding]:
    """Another replica of the live code instance, on its own host: its release, process and health.
    Each is put right by restarting the instance (every replica, blue/green)."""
    at = f"code {code.number}: replica {rank} on {replica.host}"
    host = registry.agents.get(replica.host)
    seen = facts.replicas.get((service, rank))
    if host is None or host.state != "connected" or seen is None:
        return [Finding(where, f"{at}: agent {replica.host} is not connected, cannot check", "")]
    if seen.commit == "missing":
        return [Finding(where, f"{at}: release folder is missing", "checkout", service, code.commit)]
    if seen.commit and seen.commit != code.commit:
        return [Finding(where, f"{at}: release is at {seen.commit[:12]}, not {code.commit[:12]}", "", service)]
    if not seen.alive:
        return [Finding(where, f"{at}: process {replica.process} is not running", "restart", service)]
    if seen.health:
        return [Finding(where, f"{at}: health check fails: {seen.health}", "restart", service)]
    return []


def _mysql_findings(env_key, service, where, mysql, ledger, facts: Facts) -> list[Finding]:
    """The live MariaDB instance: its database and its user."""
    out: list[Finding] = []
    row = ledger.instance(env_key, service, "mysql", mysql.number)
    names = row.names
    if names["database"] not in facts.databases:
        out.append(Finding(where, f"mysql {mysql.number}: database {names['database']} is missing", "",
                           service, names["database"]))
    if names["user"] not in facts.mysql_users:
        out.append(Finding(where, f"mysql {mysql.number}: user {names['user']} is missing", "mysql-user",
                           service, names["user"]))
    return out


def _redis_findings(env_key, spec, service, where, redis, ledger, facts: Facts) -> list[Finding]:
    """The live Redis instance: its ACL user, the keys it may reach, and no scripting; or, for a
    dedicated one, its server running and answering."""
    out: list[Finding] = []
    row = ledger.instance(env_key, service, "redis", redis.number)
    names = row.names
    if names.get("mode") == "dedicated":
        problem = facts.dedicated.get((service, redis.number), "")
        if problem:  # a service no longer in the spec had its server stopped with it: nothing to restart
            fix = "" if problem.startswith("cannot") or service not in {s.name for s in spec.services} else "redis-server"
            out.append(Finding(where, f"redis {redis.number}: dedicated server {problem}", fix, service,
                               str(redis.number)))
        return out
    patterns = facts.redis_users.get(names["user"])
    if patterns is None:
        out.append(Finding(where, f"redis {redis.number}: ACL user {names['user']} is missing",
                           "redis-user", service, names["user"]))
    elif patterns != f"~{names['prefix']}*":
        out.append(Finding(where, f"redis {redis.number}: ACL user {names['user']} allows {patterns or 'no keys'}",
                           "redis-user", service, names["user"]))
    elif facts.redis_channels.get(names["user"], f"&{names['prefix']}*") != f"&{names['prefix']}*":
        out.append(Finding(where, f"redis {redis.number}: ACL user {names['user']} may use channels "
                           f"{facts.redis_channels[names['user']]}", "redis-user", service, names["user"]))
    elif names["user"] in facts.redis_scripting:
        out.append(Finding(where, f"redis {redis.number}: ACL user {names['user']} may run scripts, "
                           "which can hold the shared server", "redis-user", service, names["user"]))
    return out


def _route_findings(env_key, spec, facts: Facts) -> list[Finding]:
    """The environment's nginx file, against what the ledger says it should be."""
    out: list[Finding] = []
    web = any(s.is_web for s in spec.services)
    if facts.nginx is None and web:
        out.append(Finding(env_key, "nginx file is missing", "route"))
    elif facts.nginx is not None and facts.nginx != facts.nginx_expected:
        out.append(Finding(env_key, "nginx file differs from what the ledger says", "route"))
    for router, served in sorted(facts.certificates.items()):
        if served != facts.certificate_expected:
            out.append(Finding(env_key, f"the certificate on router {router} is "
                               + ("missing" if served is None else "not the one obtained by ACME" if spec.tls.auto
                                  else "not the one in the environment's secret"),
                               "route"))
    for router, (content, expected) in sorted(facts.other_routers.items()):
        if content is None and web:
            out.append(Finding(env_key, f"nginx file is missing on router {router}", "route"))
        elif content is not None and content != expected:
            out.append(Finding(env_key, f"nginx file on router {router} differs from what the ledger says", "route"))
    return out


def _orphan_findings(env_key, spec, ledger, facts: Facts, claimed, unit) -> list[Finding]:
    """What is ours and no environment in the ledger holds: folders, route files, processes, databases."""
    out: list[Finding] = []
    owner = ledger.owner
    for host, folders in sorted(facts.folders.items()):
        for folder in folders:
            if folder.rsplit("/", 1)[-1] not in claimed["folders"] and _ours(facts.folder_marks.get(folder, ""), owner):
                out.append(Finding(host, f"orphan folder {folder}", "orphan", target=folder))
    # Databases and ACL users are shared by every environment on a server: only names in this
    # environment's own namespace are judged here.
    own = naming.unit_base(spec.app, spec.environment, "x")[:-1]
    for name in sorted(set(facts.nginx_files) - claimed["nginx"]):
        if _ours(facts.nginx_marks.get(name, ""), owner):
            out.append(Finding("nginx", f"orphan route file {name}", "", target=name))
    rows = ledger.instances(env_key)
    units = {unit(r.service) for r in rows} | {unit(s.name) for s in spec.services}
    known = {(unit(r.service), replica.process) for r in rows if r.component == "code" and r.status != Status.REMOVED
             for replica in r.replicas}
    # A service's dedicated Redis servers: instance n under its Redis unit.
    redis_units = {naming.redis_unit(spec.app, spec.environment, r.service) for r in rows}
    units |= redis_units
    known |= {(naming.redis_unit(spec.app, spec.environment, r.service), str(r.number)) for r in rows
              if r.names.get("mode") == "dedicated" and r.status not in (Status.REMOVED, Status.TAKEN)}
    for (name, instance), alive in sorted(facts.processes.items()):
        if name in units and (name, instance) not in known:
            out.append(Finding("processes", f"orphan process {name}@{instance}"
                               + ("" if alive else " (dead)"), "", target=f"{name}@{instance}"))
    for name in sorted(n for n in facts.databases - claimed["databases"] if n.startswith(own)):
        if _ours(facts.database_marks.get(name, ""), owner):
            out.append(Finding("mysql", f"orphan database {name} (marked as this deployer's)", "", target=name))
    return out


def _ours(mark: str, owner: str) -> bool:
    return bool(owner) and ownership.marked_by(mark) == owner


def foreign(spec, owner: str, facts: Facts, claimed) -> list[str]:
    """Pure: things in our namespaces that no environment in the ledger holds and that carry no
    mark of ours: another controller's, a leftover of an earlier store, or made by hand. They
    are reported and left alone; they are not drift of this environment."""
    def whose(mark: str) -> str:
        other = ownership.marked_by(mark)
        return "no mark" if other is None else f"marked by deployer {other}"

    out = []
    own = naming.unit_base(spec.app, spec.environment, "x")[:-1]
    for host, folders in sorted(facts.folders.items()):
        for folder in folders:
            mark = facts.folder_marks.get(folder, "")
            if folder.rsplit("/", 1)[-1] not in claimed["folders"] and not _ours(mark, owner):
                out.append(f"{host}: folder {folder} is not this deployer's ({whose(mark)}): left alone")
    for name in sorted(set(facts.nginx_files) - claimed["nginx"]):
        mark = facts.nginx_marks.get(name, "")
        if not _ours(mark, owner):
            out.append(f"nginx: route file {name} is not this deployer's ({whose(mark)}): left alone")
    for name in sorted(n for n in facts.databases - claimed["databases"] if n.startswith(own)):
        mark = facts.database_marks.get(name, "")
        if not _ours(mark, owner):
            out.append(f"mysql: database {name} is not this deployer's ({whose(mark)}): left alone")
    for name in sorted(n for n in facts.mysql_users - claimed["mysql_users"] if n.startswith(own)):
        out.append(f"mysql: user {name} is unknown to the ledger: left alone")
    for name in sorted(n for n in set(facts.redis_users) - claimed["redis"] if n.startswith(own)):
        out.append(f"redis: ACL user {name} is unknown to the ledger: left alone")
    return out


def read_acl_list(text: str, facts: Facts) -> None:
    """The Redis facts in `ACL LIST`'s output (password hashes already cut on the host)."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "user" and parts[1].startswith("auto-"):
            facts.redis_users[parts[1]] = " ".join(p for p in parts[2:] if p.startswith("~"))
            channels = [p for p in parts[2:] if p.startswith("&") or p == "allchannels"]
            if channels:
                facts.redis_channels[parts[1]] = " ".join(channels)
            if scripting_allowed(parts[2:]):
                facts.redis_scripting.add(parts[1])
        elif parts[:2] == ["user", "default"]:
            facts.redis_default_open = "on" in parts and "nopass" in parts


def scripting_allowed(rules: list[str]) -> bool:
    """Whether an ACL LIST rule lets its user run Lua scripts or functions (Redis expands
    categories into commands there, so the commands themselves are looked for)."""
    allowed = False
    for rule in rules:
        if rule in ("+@all", "allcommands", "+@scripting") or rule.split("|")[0] in ("+eval", "+evalsha", "+fcall"):
            allowed = True
        elif rule in ("-@all", "nocommands", "-@scripting"):
            allowed = False
    return allowed


def warnings(facts: Facts) -> list[str]:
    """What is wrong on a shared server without being drift of this environment: reported, and
    never a reason for verify to fail (it is the server's set-up, not the deploy's)."""
    out = []
    if facts.redis_default_open:
        out.append("redis: the default user needs no password: any tenant can log in as it and bypass "
                   "the ACL namespaces (see deploy/redis-acl.md)")
    return out


def claimed_names(ledger) -> dict[str, set[str]]:
    """Every auto-* name some environment in the ledger holds (folders, databases, ACL users)."""
    folders, databases, redis, nginx, mysql_users = set(), set(), set(), set(), set()
    for r in ledger.every_instance():
        app, env = r.env_key.split("/", 1)
        folders.add(naming.unit_base(app, env, r.service))
        if r.status != Status.REMOVED:
            nginx.add(naming.nginx_file(app, env))
        if r.status in (Status.REMOVED, Status.TAKEN):  # a taken number's names are someone else's
            continue
        if r.component == "mysql":
            databases.add(r.names.get("database", ""))
            mysql_users.add(r.names.get("user", ""))
        elif r.component == "redis":
            redis.add(r.names.get("user", ""))
    return {"folders": folders, "databases": databases, "redis": redis, "nginx": nginx, "mysql_users": mysql_users}
