"""Attacks on a shared server, replayed for real: each test plays a hostile tenant, a rogue agent
or a local user, and asserts that the concrete harm did not happen (not merely that an error was
printed). Where it can be shown safely, a test also shows the attack works without its defence.

Sections are independent (each builds what it needs); see docs/decisions/013-threat-model.md.
"""

from __future__ import annotations


# ---------------------------------------------------------------- 1. ownership before destruction


# ---------------------------------------------------------------- 2. tenant code without root


# ---------------------------------------------------------------- 3. agents prove what they provide
import queue
import shutil
import sqlite3
import threading
from pathlib import Path

import grpc
import yaml

from agent import tls
from controller import naming
from protos import deployer_pb2 as pb
from protos import deployer_pb2_grpc as pb_grpc
from tests.deploy_harness import deploy_cluster, example_repo, purge, service_users_base, unique_env, wait_http_ok
from tests.harness import wait_for

ROGUE = "a-rogue-1"  # sorts before every genuine agent: the one picked first when it matched
# Passes `nginx -t` once inside a proxy_pass, and adds a server that answers for everyone.
BREAKOUT = ("127.0.0.1:1/; } } server { listen 80; location / { return 200 owned; } } "
            "server { location /x { proxy_pass http://127.0.0.1")


class RogueLink:
    """An agent stream with a genuine certificate and a hostile hello; keeps all it is sent."""

    def __init__(self, controller, key: bytes, cert: bytes, settings: dict[str, str]) -> None:
        ca = (controller.store / "pki" / "ca.crt").read_bytes()
        self.channel = grpc.secure_channel(
            controller.address, grpc.ssl_channel_credentials(ca, key, cert),
            options=[("grpc.ssl_target_name_override", tls.SERVER_NAME)])
        self.outgoing: queue.Queue = queue.Queue()
        self.outgoing.put(pb.AgentMessage(hello=pb.Hello(
            agent_id=ROGUE, roles=["daemons"], capabilities=["mysql", "nginx", "redis"], version="rogue",
            heartbeat_interval_s=3600, settings=settings)))  # no heartbeats needed while the test runs
        self.received: list = []
        self.status = None
        self.done = threading.Event()
        self.call = pb_grpc.AgentGatewayStub(self.channel).Connect(iter(self.outgoing.get, None), timeout=900)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.received.append(message)
        except grpc.RpcError as exc:
            self.status = (exc.code(), exc.details() or "")
        self.done.set()

    def welcomed(self) -> bool:
        return any(m.WhichOneof("msg") == "welcome" for m in self.received)

    def close(self) -> None:
        self.outgoing.put(None)
        self.call.cancel()
        self.channel.close()


def _enrol_rogue(controller) -> tuple[bytes, bytes]:
    """Enrolled as an operator would enrol a daemons host: a token for the role, nothing granted."""
    ca = (controller.store / "pki" / "ca.crt").read_bytes()
    key, csr = tls.new_key_and_csr(ROGUE)
    with grpc.secure_channel(controller.enroll_address, grpc.ssl_channel_credentials(ca),
                               options=[("grpc.ssl_target_name_override", tls.SERVER_NAME)]) as channel:
        reply = pb_grpc.EnrollmentStub(channel).Enroll(pb.EnrollRequest(
            token=controller.token(("daemons",), agent_id=ROGUE), agent_id=ROGUE, csr_pem=csr), timeout=10)
    return key, reply.certificate_pem


def test_a_rogue_agent_gets_no_work_no_password_and_no_line_in_nginx():
    """An agent enrolled for daemons claims mysql, redis and nginx, with settings of its own. Its
    nginx syntax is refused at the hello; its well-formed claims are ignored: a real deploy with
    it connected sends it nothing, and the router's real nginx file holds nothing it said.
    (tests/test_grants.py shows the same hello picked, and its address passing nginx -t, without
    the checks.)"""
    base = service_users_base("deployer-attack3-")
    nginx, cluster = deploy_cluster(base)
    env, rogue = unique_env(), None
    try:
        key, cert = _enrol_rogue(cluster.controller)
        for hostile in ({"address": BREAKOUT}, {"nginx.listen": "80; include /etc/shadow"},
                        {"mysql.host": "db.example\n"}, {"redis.port": "6379 ; FLUSHALL"}):
            refused = RogueLink(cluster.controller, key, cert, hostile)
            assert refused.done.wait(20), "the hostile hello was not answered"
            code, details = refused.status
            refused.close()
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("setting ")
            assert "\n" not in details and not refused.welcomed()
        assert ROGUE not in cluster.agents_json()  # nothing of it was recorded

        rogue_conf = base / "rogue-nginx"
        rogue = RogueLink(cluster.controller, key, cert, {
            "address": "10.66.66.66", "mysql.host": "10.66.66.66", "mysql.port": "3306",
            "redis.host": "10.66.66.66", "redis.port": "6379", "nginx.conf_dir": str(rogue_conf),
            "nginx.listen": "6666", "nginx.test": "true", "nginx.reload": "true"})
        wait_for(rogue.welcomed, 20, what="the rogue's welcome (it is a genuine daemons agent)")
        listed = cluster.agents_json()[ROGUE]
        assert listed["state"] == "connected" and listed["capabilities"] == [] and listed["granted"] == []
        assert set(listed["claimed"]) == {"mysql", "nginx", "redis"}
        assert listed["address"] == "127.0.0.1" and not listed["address_granted"]  # its link's, not its word
        assert any(e["agent_id"] == ROGUE for e in cluster.controller.events("agent.claims_ignored"))

        repo = example_repo(base)
        spec = base / "environment.yml"
        spec.write_text(yaml.safe_dump({"app": "shop", "environment": env, "domain": f"{env}.shop.test",
                                          "services": {"web": {
                                              "path": "/", "source": str(repo), "ref": "main", "root": "web",
                                              "install": "npm ci --omit=dev --no-audit --no-fund --prefer-offline",
                                              "build": "npm run build", "migrate": "node migrate.js",
                                              "start": "node server.js", "health": "/health",
                                              "uses": ["mysql", "redis"]}}}))
        done = cluster.deployctl("apply", str(spec), timeout=600)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
        wait_http_ok(nginx.port, "/", f"{env}.shop.test")

        # No operation reached it, by its stream or in the controller's records.
        assert rogue.status is None, rogue.status
        assert [m.WhichOneof("msg") for m in rogue.received] == ["welcome"]
        db = sqlite3.connect(cluster.controller.store / "deployer.db")
        assert db.execute("SELECT COUNT(*) FROM operations WHERE agent_id = ?", (ROGUE,)).fetchone()[0] == 0
        hosts = {row[0] for row in db.execute("SELECT host FROM instances WHERE env_key = ?", (f"shop/{env}",))}
        assert hosts == {"computing-1"}
        # The passwords made for the deploy went to the genuine providers, never to it.
        service = naming.service_dir(str(base / "srv"), "shop", env, "web")
        dotenv = next(Path(service).glob("releases/*/.env")).read_text()
        passwords = [line.split("=", 1)[1] for line in dotenv.splitlines() if line.startswith("DB_PASSWORD=")]
        assert passwords and len(passwords[0]) >= 20
        assert all(passwords[0].encode() not in m.SerializeToString() for m in rogue.received)
        assert "10.66.66.66" not in dotenv
        # The router's real nginx file: routes to the web service's host as the link shows it, and
        # holds no text the rogue sent; the rogue's own nginx folder was never written.
        conf = (nginx.conf_dir / naming.nginx_file("shop", env)).read_text()
        assert "proxy_pass http://127.0.0.1:" in conf and f"listen {nginx.port};" in conf
        assert all(text not in conf for text in ("10.66.66.66", "6666", "owned", "rogue"))
        assert conf.count("server {") == 1
        assert not rogue_conf.exists()
    finally:
        if rogue is not None:
            rogue.close()
        cluster.close()
        nginx.stop()
        purge("shop", env)
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------- 4. operators authenticate


# ---------------------------------------------------------------- 5. limits per environment


# ---------------------------------------------------------------- 6. shared Redis stays available


# ---------------------------------------------------------------- 7. acknowledged output is kept


# ---------------------------------------------------------------- 8. least knowledge


# ---------------------------------------------------------------- 9. one owner per port
import subprocess

from tests.harness import PY, ROOT, Cluster, free_port, free_port_pair, wait_for


def test_a_second_controller_on_a_taken_port_exits_and_the_first_keeps_its_agents(tmp_path):
    """Before, gRPC's SO_REUSEPORT let the second bind the agent port too, and the kernel shared
    the agents' connections between two CAs (tests/test_grants.py shows the bind succeeding
    without the option)."""
    operator_port = free_port()
    (tmp_path / "first").mkdir()
    first = Cluster(tmp_path / "first")
    first.controller.extra_args = ("--operator-listen", f"127.0.0.1:{operator_port}")
    try:
        first.controller.start()
        for agent_id in ("computing-1", "computing-2"):
            first.add_agent(agent_id)
        first.wait_connected("computing-1", "computing-2")
        connected = len(first.controller.events("agent.connected"))
        c = first.controller
        attempts = [
            (["--listen", c.address], f"agents on {c.address}"),
            (["--listen", f"127.0.0.1:{free_port_pair()}", "--enroll-listen", c.enroll_address],
             f"enrolment on {c.enroll_address}"),
            (["--listen", f"127.0.0.1:{free_port_pair()}", "--operator-listen", f"127.0.0.1:{operator_port}"],
             f"operators on 127.0.0.1:{operator_port}"),
            (["--listen", f"localhost:{c.port}"], f"127.0.0.1:{c.port} is already taken"),
            (["--listen", f"127.0.0.1:{free_port_pair()}", "--socket", str(c.socket)],
             f"the operator socket {c.socket} is served by another process"),
        ]
        for number, (args, named) in enumerate(attempts):
            second = tmp_path / f"second-{number}"
            second.mkdir()
            done = subprocess.run([PY, "-m", "controller.daemon", "--store", str(second / "store"),
                                     "--log-file", str(second / "controller.log"), *args],
                                    cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert done.returncode == 2, done.stderr
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and named in lines[0], done.stderr
            assert "taken" in lines[0] or "served by another process" in lines[0]

        # The first still serves: its socket answers, its agents are connected and run work, and an
        # agent that dials again lands on it.
        assert c.socket.exists() and c.proc.poll() is None
        first.wait_connected("computing-1", "computing-2")
        first.agents["computing-2"].stop()
        first.agents["computing-2"].start()
        wait_for(lambda: len(c.events("agent.connected")) > connected, 30, what="computing-2 back on the first")
        first.wait_connected("computing-1", "computing-2")
        done = first.deployctl("exec", "--all", "--", "echo", "still-here")
        assert done.returncode == 0 and done.stdout.count(b"still-here") == 2, done.stderr
    finally:
        first.close()
