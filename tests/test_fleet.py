"""Several servers: every agent on a test host of its own (a network namespace on a bridge,
tests/netns.py), so every request between hosts crosses interfaces. Here: placement by room
across two computing hosts, pins, data instances found on the host the ledger recorded (the data
host's MariaDB and Redis listen on its own address), a router of its own, and a computing host cut
off (its link down) until it is lost and its service placed elsewhere."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.deploy_harness import example_repo, git, new_commit, new_repo, unique_env
from tests.fleet_harness import fleet_world
from tests.harness import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

APP = "fleet"
LOST_AFTER = 6.0
# A web service of Python's standard library only: what placement is about here is where it runs.
PLAIN = {"index.html": "plain\n"}


@pytest.fixture(scope="module")
def world():
    with fleet_world("deployer-fleet-", APP, routers=2, computing=2, lost_after=LOST_AFTER) as w:
        w["plain"] = new_repo(w["base"] / "plain-repo", PLAIN)
        w["shop"] = example_repo(w["base"])
        yield w


def new_env(world) -> str:
    env = unique_env()
    world["envs"].append(env)
    return env


def plain(world, **extra) -> dict:
    return {"path": "/", "source": str(world["plain"]), "ref": "main",
            "start": "python3 -m http.server $PORT --bind 0.0.0.0", "health": "/", **extra}


def shop_web(world) -> dict:
    cache = world["npm_cache"]
    return {"path": "/", "source": str(world["shop"]), "ref": "main", "root": "web",
            "install": f"npm ci --omit=dev --no-audit --no-fund --offline --cache {cache}",
            "build": "npm run build", "migrate": "node migrate.js", "start": "node server.js",
            "health": "/health", "uses": ["mysql", "redis"], "env": {"HOST": "0.0.0.0"}}


def spec_file(world, env: str, services: dict, limits: dict | None = None) -> Path:
    path = world["base"] / f"{env}.yml"
    body = {"app": APP, "environment": env, "domain": f"{env}.fleet.test", "services": services}
    if limits:
        body["limits"] = limits
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    return result.stdout.decode()


def status(world, env: str) -> list[dict]:
    return json.loads(ok(world["cluster"].deployctl("status", f"{APP}/{env}", "--json")))


def host_of(world, env: str, service: str = "web") -> str:
    return next(s["host"] for s in status(world, env) if s["service"] == service)


def answers(world, env: str, path: str = "/", router: str = "router-1") -> int:
    try:
        return world["fleet"].get(router, path, f"{env}.fleet.test")[0]
    except OSError:
        return 0


def body(world, env: str, router: str) -> bytes:
    try:
        return world["fleet"].get(router, "/", f"{env}.fleet.test")[1]
    except OSError:
        return b""


def test_environments_spread_by_room_and_plan_says_where(world):
    cluster = world["cluster"]
    # The hosts share one kernel, so what each may hand out is granted (never above what it measures).
    for name in ("computing-1", "computing-2"):
        ok(cluster.deployctl("agents", "grant", name, "--capacity", "memory=8G,cpu=2"))
    envs = [new_env(world) for _ in range(20)]
    first = spec_file(world, envs[0], {"web": plain(world)}, {"memory": "256M", "cpu": 0.1})
    planned = cluster.deployctl("plan", str(first))
    shown = planned.stdout.decode()
    assert planned.returncode == 2, shown + planned.stderr.decode()  # changes to make
    assert "    on computing-" in shown and "most room of 2 agents of role computing" in shown, shown

    def deploy(env):
        return cluster.deployctl("apply", str(spec_file(world, env, {"web": plain(world)},
                                                         {"memory": "256M", "cpu": 0.1})), timeout=600)
    # Five at a time: jobs of different environments place at once and must see each other's choice.
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        for result in pool.map(deploy, envs):
            ok(result)
    hosts = [host_of(world, env) for env in envs]
    counts = {h: hosts.count(h) for h in ("computing-1", "computing-2")}
    print(f"20 environments: {counts}")
    assert max(counts.values()) <= 12, counts   # no computing host holds more than 60 %
    assert all(answers(world, env, router=r) == 200 for env in envs for r in ("router-1", "router-2"))
    listed = {a["id"]: a for a in json.loads(ok(cluster.deployctl("agents", "--json")))}
    assert listed["computing-1"]["instances"] + listed["computing-2"]["instances"] >= 20
    assert listed["computing-1"]["capacity"]["memory_bytes"] == 8 << 30
    assert listed["router-1"]["instances"] == listed["router-2"]["instances"] == listed["daemons-1"]["instances"] == 0


def test_pins_to_a_host_or_a_label_and_bad_pins_are_one_line(world):
    cluster = world["cluster"]
    ok(cluster.deployctl("agents", "grant", "computing-2", "--label", "zone=b"))
    ok(cluster.deployctl("agents", "grant", "computing-1", "--label", "zone=a"))
    pinned, labelled = new_env(world), new_env(world)
    ok(cluster.deployctl("apply", str(spec_file(world, pinned, {"web": plain(world, host="computing-1")})),
                         timeout=600))
    assert host_of(world, pinned) == "computing-1"
    ok(cluster.deployctl("apply", str(spec_file(world, labelled, {"web": plain(world, host_labels={"zone": "b"})})),
                         timeout=600))
    assert host_of(world, labelled) == "computing-2"
    # A new pin moves it: a new instance where the pin points, the route follows.
    ok(cluster.deployctl("apply", str(spec_file(world, pinned, {"web": plain(world, host="computing-2")})),
                         timeout=600))
    assert host_of(world, pinned) == "computing-2" and answers(world, pinned) == 200

    bad = new_env(world)
    where = f"{world['base']}/{bad}.yml:11"  # the line of the pin, after path, source, ref, start, health
    for extra, expected in (
            ({"host": "computing-9"}, f"{where}: services.web.host: host computing-9 is not an agent of this "
                                      "controller (agents of role computing: computing-1, computing-2)"),
            ({"host": "daemons-1"}, f"{where}: services.web.host: host daemons-1 does not have role computing "
                                    "(its roles: daemons)"),
            ({"host_labels": {"zone": "c"}}, f"{where}: services.web.host_labels: no agent of role computing "
                                             "has labels zone=c (labels granted: zone=a; zone=b; deployctl agents "
                                             "grant ID --label KEY=VALUE)")):
        result = cluster.deployctl("plan", str(spec_file(world, bad, {"web": plain(world, **extra)})))
        assert result.returncode == 1, result.stdout  # a bad order (2 would mean: changes to make)
        assert result.stderr.decode().strip().splitlines() == [f"deployctl: {expected}"]


def test_data_is_reached_across_the_network_on_the_host_the_ledger_recorded(world):
    cluster, data = world["cluster"], world["fleet"].data["daemons-1"]
    env = new_env(world)
    ok(cluster.deployctl("apply", str(spec_file(world, env, {"web": shop_web(world)})), timeout=900))
    wait_for(lambda: answers(world, env) == 200, 30, every=0.3, what="the shop through router-1")
    # Its database is on the data host's own MariaDB (the machine's has none of it), and the
    # service reached it over the bridge, at the data host's address.
    database = f"auto-{APP}-{env}-web-1"
    assert data.sql(f"SHOW DATABASES LIKE '{database}'").split() == [database]
    assert data.sql(f"SELECT COUNT(*) FROM `{database}`.visits").strip() not in ("", "0")
    assert data.redis("--scan", "--pattern", f"auto-{APP}-{env}-web-1:*").split()
    web = next(s for s in status(world, env) if s["service"] == "web")
    connections = data.sql("SELECT DISTINCT SUBSTRING_INDEX(host, ':', 1) FROM information_schema.processlist "
                           f"WHERE user = 'auto-{APP}-{env}-web-1'").split()
    computing = world["fleet"].host(web["host"]).address
    assert connections == [computing], connections
    # A redeploy reuses the data instances where the ledger has them; verify looks there.
    new_commit(world["shop"], "v2")
    ok(cluster.deployctl("apply", str(spec_file(world, env, {"web": shop_web(world)})), timeout=900))
    assert ok(cluster.deployctl("ledger", f"{APP}/{env}", "web")).splitlines()[1:] == [
        "1       (1)   (1)    (1)", "2       (2)    |      |"]
    ok(cluster.deployctl("verify", f"{APP}/{env}", timeout=300))


def test_a_host_cut_off_is_lost_and_its_service_is_placed_elsewhere_on_the_next_deploy(world):
    cluster, fleet = world["cluster"], world["fleet"]
    env = new_env(world)
    ok(cluster.deployctl("agents", "grant", "computing-1", "--label", "zone=a"))
    ok(cluster.deployctl("agents", "grant", "computing-2", "--label", "zone=b"))
    ok(cluster.deployctl("apply", str(spec_file(world, env, {"web": plain(world, host_labels={"zone": "a"})})),
                         timeout=600))
    assert host_of(world, env) == "computing-1"
    ok(cluster.deployctl("agents", "grant", "computing-2", "--label", "zone=a"))  # both may take it now
    fleet.net.cut(fleet.host("computing-1"))
    try:
        wait_for(lambda: {a["id"]: a for a in json.loads(ok(cluster.deployctl("agents", "--json")))}
                 ["computing-1"]["state"] == "lost", LOST_AFTER + 60, every=0.5, what="computing-1 lost")
        (world["plain"] / "index.html").write_text("plain v2\n")
        git(world["plain"], "commit", "-qam", "v2")
        shown = cluster.deployctl("plan", str(spec_file(world, env, {"web": plain(world, host_labels={"zone": "a"})})))
        shown = shown.stdout.decode() + shown.stderr.decode()
        assert "on computing-2: its host computing-1 is lost" in shown, shown
        out = ok(cluster.deployctl("apply", str(spec_file(world, env, {"web": plain(world, host_labels={"zone": "a"})})),
                                   timeout=600))
        assert host_of(world, env) == "computing-2", out
        wait_for(lambda: answers(world, env) == 200, 30, every=0.3, what="the moved service answering")
        assert fleet.get("router-1", "/", f"{env}.fleet.test")[1] == b"plain v2\n"
    finally:
        fleet.net.mend(fleet.host("computing-1"))
    cluster.wait_connected("computing-1", timeout=90)
    time.sleep(0.1)


def test_every_router_serves_every_route_and_one_away_during_a_switch_gets_it_when_back(world):
    cluster, fleet = world["cluster"], world["fleet"]
    env = new_env(world)
    repo = new_repo(world["base"] / f"{env}-repo", {"index.html": "v1\n"})
    spec = spec_file(world, env, {"web": {**plain(world), "source": str(repo)}})
    ok(cluster.deployctl("apply", str(spec), timeout=600))
    assert body(world, env, "router-1") == body(world, env, "router-2") == b"v1\n"

    fleet.net.cut(fleet.host("router-2"))
    try:
        wait_for(lambda: {a["id"]: a for a in json.loads(ok(cluster.deployctl("agents", "--json")))}
                 ["router-2"]["state"] != "connected", 60, every=0.5, what="router-2 away")
        (repo / "index.html").write_text("v2\n")
        git(repo, "commit", "-qam", "v2")
        out = ok(cluster.deployctl("apply", str(spec), timeout=600))
        assert "route: router router-2 is disconnected: it gets this environment's routes when it is back" in out, out
        assert body(world, env, "router-1") == b"v2\n"
    finally:
        fleet.net.mend(fleet.host("router-2"))
    cluster.wait_connected("router-2", timeout=90)
    # Back, it is given the route the ledger holds (a `route` job), and serves the new instance.
    wait_for(lambda: body(world, env, "router-2") == b"v2\n", 60, every=0.3, what="router-2 given the new route")
    jobs = [j for j in json.loads(ok(cluster.deployctl("jobs", "--json"))) if j["env_key"] == f"{APP}/{env}"]
    assert any(j["kind"] == "route" and j["state"] == "succeeded" and "wrote the route on router-2" in j["summary"]
               for j in jobs), jobs
    verified = cluster.deployctl("verify", f"{APP}/{env}", timeout=300)
    assert verified.returncode == 0, verified.stdout.decode() + verified.stderr.decode()


def curl(world, router: str, url: str, name: str, *extra: str) -> subprocess.CompletedProcess:
    """curl from the root namespace to a router, NAME resolved to the router's address."""
    fleet = world["fleet"]
    nginx = fleet.routers[router]
    port = nginx.tls_port if url.startswith("https") else nginx.port
    return subprocess.run(["curl", "-sS", "--max-time", "5", "--resolve", f"{name}:{port}:{fleet.host(router).address}",
                           "-o", "/dev/null", "-w", "%{http_code} %{redirect_url} %{ssl_verify_result}", *extra,
                           url.replace("PORT", str(port))], capture_output=True, text=True, timeout=30)


def https_on_every_router(world, env: str, name: str, alias: str, path: str) -> None:
    """Each router answers https://NAME/ and https://ALIAS/ with 200 (trusting the world's
    ca.pem), redirects plain HTTP for `path` with 308, serves a certificate for both names, and
    keeps the key root's, 0600."""
    fleet = world["fleet"]
    for router in fleet.routers:
        for host_name in (name, alias):
            got = curl(world, router, f"https://{host_name}:PORT/", host_name, "--cacert", str(world["base"] / "ca.pem"))
            assert got.stdout.split()[0] == "200", (router, host_name, got.stdout, got.stderr)
            plain_http = curl(world, router, f"http://{host_name}:PORT{path}", host_name)
            assert plain_http.stdout.split()[:2] == ["308", f"https://{host_name}{path}"], plain_http.stdout
        assert served_names(world, router, name)[0] == sorted([name, alias])
        served = fleet.routers[router].conf_dir / "auto-tls" / f"auto-{APP}-{env}.key"
        assert oct(served.stat().st_mode & 0o777) == "0o600" and served.stat().st_uid == 0


def https_under_load(world, router: str, name: str, action) -> tuple[int, list[str]]:
    """Run `action` while one client asks https://NAME/ of a router again and again (trusting
    the world's ca.pem); (requests, the failed ones) once a second has passed after it."""
    import threading
    failures, count, stop = [], [0], threading.Event()

    def load():
        while not stop.is_set():
            got = curl(world, router, f"https://{name}:PORT/", name, "--cacert", str(world["base"] / "ca.pem"))
            count[0] += 1
            if got.stdout.split()[:1] != ["200"]:
                failures.append(got.stdout + got.stderr)
    thread = threading.Thread(target=load)
    thread.start()
    try:
        action()
        time.sleep(1)
    finally:
        stop.set()
        thread.join()
    return count[0], failures


def served_names(world, router: str, name: str) -> tuple[list[str], int]:
    """The DNS names and serial of the certificate a router serves for NAME (SNI)."""
    import socket
    import ssl
    nginx, address = world["fleet"].routers[router], world["fleet"].host(router).address
    context = ssl.create_default_context(cafile=str(world["base"] / "ca.pem"))
    with socket.create_connection((address, nginx.tls_port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls_sock:
        der = tls_sock.getpeercert(binary_form=True)
    from cryptography import x509
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sorted(san.get_values_for_type(x509.DNSName)), cert.serial_number


def test_https_with_the_operators_certificate_on_every_router_redirects_http_and_swaps_on_renewal(world):
    from tests.certs import OwnCA
    cluster, fleet = world["cluster"], world["fleet"]
    ca = OwnCA()
    (world["base"] / "ca.pem").write_text(ca.pem)
    env = new_env(world)
    name, alias = f"{env}.fleet.test", f"www.{env}.fleet.test"
    key = f"{APP}/{env}"
    path = world["base"] / f"{env}.yml"
    path.write_text(yaml.safe_dump({"app": APP, "environment": env, "domain": name, "aliases": [alias],
                                    "tls": {"certificate": "TLS_CERT", "key": "TLS_KEY"},
                                    "services": {"web": plain(world)}}, sort_keys=False))

    def secret(label: str, value: str) -> None:
        done = subprocess.run([*cluster_deployctl(cluster), "secret", "set", key, label], input=value.encode(),
                              capture_output=True, env=cluster.env(), timeout=60)
        assert done.returncode == 0, done.stderr

    def refused(expected: str) -> None:
        result = cluster.deployctl("apply", str(path), timeout=120)
        assert result.returncode == 1 and result.stderr.decode().strip().splitlines() == [f"deployctl: {expected}"], \
            result.stdout.decode() + result.stderr.decode()
        for router in fleet.routers.values():  # no router was touched
            assert not list(router.conf_dir.glob(f"auto-{APP}-{env}*")) and not list(router.conf_dir.glob(f"auto-tls/*{env}*"))

    refused(f"{path}:7: tls.certificate: secret TLS_CERT is not set: deployctl secret set {key} TLS_CERT < FILE")
    wrong_cert, wrong_key = ca.issue(name)          # no alias in it
    secret("TLS_CERT", wrong_cert)
    secret("TLS_KEY", ca.other_key())               # and not its key
    refused(f"{path}:6: tls: the key is not the certificate's: they are not a pair")
    secret("TLS_KEY", wrong_key)
    refused(f"{path}:6: tls: the certificate does not cover {alias} (it names {name})")
    assert wrong_key.splitlines()[1] not in ok(cluster.deployctl("jobs", "--json"))

    cert, tls_key = ca.issue(name, alias)
    secret("TLS_CERT", cert)
    secret("TLS_KEY", tls_key)
    out = ok(cluster.deployctl("apply", str(path), timeout=600))
    assert tls_key.splitlines()[1] not in out
    https_on_every_router(world, env, name, alias, "/x?y=1")
    ok(cluster.deployctl("verify", key, timeout=300))

    # Renewal: the operator sets the new pair; verify names the drift on each router, repair swaps it
    # in (an nginx reload), and requests through the swap keep succeeding.
    before = served_names(world, "router-1", name)[1]
    renewed, renewed_key = ca.issue(name, alias, days=60)
    secret("TLS_CERT", renewed)
    secret("TLS_KEY", renewed_key)
    drift = cluster.deployctl("verify", key, timeout=300)
    assert drift.returncode == 2 and b"the certificate on router router-1 is not the one in the environment's secret" \
        in drift.stdout, drift.stdout.decode()
    count, failures = https_under_load(world, "router-1", name,
                                       lambda: ok(cluster.deployctl("repair", key, timeout=300)))
    print(f"renewal under load: {count} requests, {len(failures)} failed")
    assert count > 5 and failures == []
    assert served_names(world, "router-1", name)[1] != before
    ok(cluster.deployctl("verify", key, timeout=300))

    # One name, one environment: another's alias cannot take it.
    other = new_env(world)
    taker = spec_file(world, other, {"web": plain(world)})
    taker.write_text(taker.read_text().replace(f"domain: {other}.fleet.test\n",
                                               f"domain: {other}.fleet.test\naliases:\n- {alias}\n"))
    taken = cluster.deployctl("apply", str(taker), timeout=120)
    assert taken.returncode == 1 and taken.stderr.decode().strip() == \
        f"deployctl: {taker}: alias {alias} is already used by {key}", taken.stderr


def cluster_deployctl(cluster) -> list[str]:
    import sys
    return [sys.executable, "-m", "deployctl.cli"]
