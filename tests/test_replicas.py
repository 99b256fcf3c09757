"""`replicas: N` across network hosts: one code instance on both computing hosts behind one nginx
upstream on both routers; a computing host cut off under load (requests go on through the other
replica), then, once it has been lost for `replace_after`, its replica started on the other host
and the move recorded; the host back, repair stops what it left running."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time

import pytest

from tests.fleet_harness import fleet_world
from tests.harness import wait_for
from tests.test_fleet import APP, PLAIN, new_env, ok, plain, spec_file, status
from tests.deploy_harness import new_repo

import os

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

LOST_AFTER = 5.0
REPLACE_AFTER = 6.0


@pytest.fixture(scope="module")
def world():
    def settings(base):
        path = base / "controller.yml"
        path.write_text(json.dumps({"health": {"replace_after": f"{REPLACE_AFTER:g}s"}}))
        return ("--config", str(path))
    with fleet_world("deployer-replicas-", APP, routers=2, computing=2, lost_after=LOST_AFTER,
                     controller_args=settings) as w:
        w["plain"] = new_repo(w["base"] / "plain-repo", PLAIN)
        yield w


class Traffic:
    """One client asking a router again and again, each answer timed: (when, ok, what)."""

    def __init__(self, world, router: str, name: str) -> None:
        fleet = world["fleet"]
        self.address, self.port, self.name = fleet.host(router).address, fleet.routers[router].port, name
        self.answers: list[tuple[float, bool, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            conn = http.client.HTTPConnection(self.address, self.port, timeout=10)
            try:
                conn.request("GET", "/", headers={"Host": self.name, "Connection": "close"})
                response = conn.getresponse()
                response.read()
                self.answers.append((time.monotonic(), response.status == 200, str(response.status)))
            except (OSError, http.client.HTTPException) as exc:
                self.answers.append((time.monotonic(), False, type(exc).__name__))
            finally:
                conn.close()
            time.sleep(0.05)

    def __enter__(self) -> "Traffic":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def failed(self, since: float, until: float = float("inf")) -> list[str]:
        return [what for when, good, what in self.answers if since <= when < until and not good]

    def count(self, since: float, until: float = float("inf")) -> int:
        return sum(since <= when < until for when, _, _ in self.answers)


def test_replicas_on_both_hosts_survive_a_host_cut_and_move_off_it_once_it_stays_lost(world):
    cluster, fleet = world["cluster"], world["fleet"]
    env = new_env(world)
    name, key = f"{env}.fleet.test", f"{APP}/{env}"
    # More replicas than hosts is allowed, and said in the plan.
    three = cluster.deployctl("plan", str(spec_file(world, env, {"web": plain(world, replicas=3)})), timeout=120)
    assert three.returncode == 2 and ("note: web: replicas: 3, but 2 connected agents of role computing: 1 replica "
                                      "shares a host") in three.stdout.decode(), three.stdout.decode()
    out = ok(cluster.deployctl("apply", str(spec_file(world, env, {"web": plain(world, replicas=2)})), timeout=600))
    (web,) = status(world, env)
    assert sorted(r["host"] for r in web["replicas"]) == ["computing-1", "computing-2"], out
    assert all(r["process"] == "running" and r["health"] == "ok" for r in web["replicas"])
    table = ok(cluster.deployctl("status", key))
    assert any(line.startswith("web#2 ") for line in table.splitlines()), table
    # One code instance for both: the ledger's diagram is that of one instance.
    ledger = json.loads(ok(cluster.deployctl("ledger", key, "--json")))["web"]
    assert [i["number"] for i in ledger["instances"] if i["component"] == "code"] == [1], ledger
    addresses = {fleet.host(r["host"]).address for r in web["replicas"]}
    left_port = next(r["port"] for r in web["replicas"] if r["host"] == "computing-1")
    for router in fleet.routers:  # each router balances over both replicas
        for _ in range(12):
            assert fleet.get(router, "/", name)[0] == 200
        seen = {upstream.rsplit(":", 1)[0] for (block, upstream), n in fleet.routers[router].routed(name).items()}
        assert addresses <= seen, (router, seen)
    ok(cluster.deployctl("verify", key, timeout=300))

    # computing-1 cut off under load: the other replica answers; nginx passes over the cut one.
    with Traffic(world, "router-1", name) as traffic:
        time.sleep(1.0)
        cut_at = time.monotonic()
        fleet.net.cut(fleet.host("computing-1"))
        try:
            time.sleep(8.0)
            settled = time.monotonic()
            time.sleep(4.0)
            first = traffic.failed(cut_at, cut_at + 8.0)
            after = traffic.failed(settled)
            print(f"computing-1 cut under load: {traffic.count(cut_at, settled)} requests in the first 8 s, "
                  f"{len(first)} failed; {traffic.count(settled)} after, {len(after)} failed")
            assert after == [] and traffic.count(settled) > 10, traffic.answers[-20:]
            # Lost, then after replace_after its replica starts on computing-2 (both share it, said).
            moved = wait_for(lambda: next((e for e in map(json.loads, ok(cluster.deployctl("events", key, "--json"))
                                                          .splitlines()) if e["kind"] == "moved"), None),
                             LOST_AFTER + REPLACE_AFTER + 240, every=1.0, what="the replica moved")
            assert moved["host"] == "computing-1" and moved["to"] == ["computing-2"], moved
            (web,) = status(world, env)
            assert [r["host"] for r in web["replicas"]] == ["computing-2", "computing-2"], web
            assert all(r["process"] == "running" for r in web["replicas"])
            replaced = time.monotonic()
            time.sleep(2.0)
            assert traffic.failed(replaced) == []
        finally:
            fleet.net.mend(fleet.host("computing-1"))
    print(f"during the whole cut and move: {len(traffic.answers)} requests, {len(traffic.failed(cut_at))} failed")
    jobs = json.loads(ok(cluster.deployctl("jobs", "--env", key, "--json")))
    heal = next(j for j in jobs if j["kind"] == "heal")
    assert heal["state"] == "succeeded", heal

    # Back: the controller stops the process the host kept running while it was away, and frees its port.
    cluster.wait_connected("computing-1", timeout=90)

    def listening() -> bool:
        out = subprocess.run(fleet.host("computing-1").argv("ss", "-Hltn"), capture_output=True, text=True).stdout
        return any(line.split()[3].endswith(f":{left_port}") for line in out.splitlines() if len(line.split()) > 3)
    wait_for(lambda: not listening(), 60, every=0.5, what=f"the old replica on computing-1 stopped (port {left_port})")
    stopped = wait_for(lambda: [e for e in map(json.loads, ok(cluster.deployctl("events", key, "--json")).splitlines())
                                if e["kind"] == "stopped"] or None, 30, what="the stop in the history")
    assert [e["host"] for e in stopped] == ["computing-1"], stopped
    ok(cluster.deployctl("verify", key, timeout=300))

    # Three replicas on two hosts: two share one (their own ports, one release), all three serve.
    three_out = ok(cluster.deployctl("apply", str(spec_file(world, env, {"web": plain(world, replicas=3)})),
                                     timeout=600))
    assert "1 replica shares a host" in three_out, three_out
    (web,) = status(world, env)
    assert sorted(r["host"] for r in web["replicas"]) == ["computing-1", "computing-2", "computing-2"] or \
        sorted(r["host"] for r in web["replicas"]) == ["computing-1", "computing-1", "computing-2"], web
    assert all(r["process"] == "running" and r["health"] == "ok" for r in web["replicas"]), web
    assert len({(r["host"], r["port"]) for r in web["replicas"]}) == 3
    ok(cluster.deployctl("verify", key, timeout=300))
