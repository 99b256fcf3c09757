"""`tls: auto` end to end: certificates from a real ACME server (pebble), HTTP-01 answered by two
routers on their own network hosts, the certificate and key sealed in the controller's store and
written only to the routers; a renewal under load; and no router to answer, refused in one line."""

from __future__ import annotations

import os

import pytest
import yaml

from tests.acme_harness import Pebble
from tests.fleet_harness import fleet_world
from tests.test_fleet import APP, https_on_every_router, https_under_load, new_env, ok, plain, served_names
from tests.harness import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@pytest.fixture(scope="module")
def world():
    pebble: list[Pebble] = []

    def settings(base):
        pebble.append(Pebble(base))
        return ("--config", str(pebble[0].settings_file()))
    with fleet_world("deployer-acme-", APP, routers=2, computing=1, lost_after=4.0,
                     controller_args=settings) as w:
        from tests.deploy_harness import new_repo
        server = pebble[0].start(answer_at=w["fleet"].host("router-2").address)
        try:
            w["plain"] = new_repo(w["base"] / "plain-repo", {"index.html": "plain\n"})
            (w["base"] / "ca.pem").write_text(server.root())   # what a browser would trust
            w["pebble"] = server
            yield w
        finally:
            server.stop()


def test_a_certificate_from_acme_on_every_router_renewed_under_load_and_never_shown(world):
    cluster, fleet = world["cluster"], world["fleet"]
    env = new_env(world)
    name, alias = f"{env}.fleet.test", f"www.{env}.fleet.test"
    key = f"{APP}/{env}"
    path = world["base"] / f"{env}.yml"
    path.write_text(yaml.safe_dump({"app": APP, "environment": env, "domain": name, "aliases": [alias],
                                    "tls": "auto", "services": {"web": plain(world)}}, sort_keys=False))
    out = ok(cluster.deployctl("apply", str(path), timeout=600))
    assert f"certificate for {name}, {alias} until" in out, out
    https_on_every_router(world, env, name, alias, "/a?b=1")
    for router in fleet.routers:  # the challenge's answers are taken down once the order ends
        assert not list((fleet.routers[router].conf_dir / "auto-acme").glob(f"auto-{APP}-{env}/*"))
    ok(cluster.deployctl("verify", key, timeout=300))

    # A renewal the operator asks for, under load: the certificate changes, no request fails.
    before = served_names(world, "router-1", name)[1]
    renewed = []
    count, failures = https_under_load(world, "router-1", name,
                                       lambda: renewed.append(ok(cluster.deployctl("certificate", key, timeout=300))))
    print(f"renewal under load: {count} requests, {len(failures)} failed")
    assert "certificate for" in renewed[0] and count > 5 and failures == []
    for router in fleet.routers:
        assert served_names(world, router, name)[1] != before
    ok(cluster.deployctl("verify", key, timeout=300))

    # Neither the certificate's key nor the account's is in any output, job folder or log, and
    # the store holds them sealed.
    secret_line = (fleet.routers["router-1"].conf_dir / "auto-tls" / f"auto-{APP}-{env}.key").read_text().splitlines()[1]
    shown = out + renewed[0] + ok(cluster.deployctl("jobs", "--json")) + ok(cluster.deployctl("status", key, "--json"))
    assert secret_line not in shown
    store = cluster.controller.store
    for file in (p for p in store.rglob("*") if p.is_file()):
        assert secret_line.encode() not in file.read_bytes(), file
    assert secret_line.encode() not in cluster.controller.log.read_bytes()

    # No router connected: `tls: auto` cannot be served, and says so in one line.
    for router in fleet.routers:
        fleet.net.cut(fleet.host(router))
    try:
        wait_for(lambda: all(a["state"] != "connected" for i, a in cluster.agents_json().items() if i in fleet.routers),
                 timeout=60, every=0.5, what="both routers away")
        again = cluster.deployctl("apply", str(path), timeout=120)
        line = again.stderr.decode().strip()
        assert again.returncode == 1 and line.startswith(f"deployctl: {path}:") and \
            "tls: auto needs a router to answer the ACME challenge, and none is connected (router-1 " in line, line
    finally:
        for router in fleet.routers:
            fleet.net.mend(fleet.host(router))
        cluster.wait_connected(*fleet.routers, timeout=90)
