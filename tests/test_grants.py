"""Agents prove what they provide, and one owner per port: the pure checks, the registry's view of
grants, and the controller's listeners (real sockets, real gRPC, no controller process)."""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
from pathlib import Path

import grpc
import pytest

from agent import config as config_mod
from common.provides import check_setting, url_host, valid_host, valid_port
from controller.environments import commands as ops
from controller.daemon import ENROLL_OPTIONS, SERVER_OPTIONS, StartupError, claim_socket, port_taken
from controller.state.db import Database
from controller.fleet.gateway import check_hello
from controller.environments.context import PlacementError, pick_agent
from controller.fleet.registry import CONNECTED, DISCONNECTED, LOST, RECONNECT_WINDOW_S, Agent, Registry, peer_host
from protos import deployer_pb2 as pb

# What a rogue agent put in its hello before: it passes `nginx -t` and adds a server of its own.
NGINX_BREAKOUT = "127.0.0.1:1/; } } server { listen 8081; location / { return 200 owned; } } server { location /x { proxy_pass http://127.0.0.1"


# ---------------------------------------------------------------- settings

@pytest.mark.parametrize("key, value, ok", [
    ("address", "10.0.0.5", True),
    ("address", "db-1.internal.example.net", True),
    ("address", "2001:db8::7", True),
    ("address", "web-1.", True),
    ("address", NGINX_BREAKOUT, False),
    ("address", "10.0.0.5:80", False),
    ("address", "[::1]", False),
    ("address", "a b", False),
    ("address", "-bad.example", False),
    ("address", "1.2.3.999", False),
    ("address", "", False),
    ("address", "x" * 64 + ".example", False),
    ("mysql.host", "127.0.0.1", True),
    ("mysql.host", "db;rm -rf /", False),
    ("mysql.port", "3306", True),
    ("mysql.port", "0", False),
    ("mysql.port", "65536", False),
    ("mysql.port", "33a", False),
    ("mysql.port", "٣٣", False),        # digits, but not ASCII ones
    ("redis.host", "cache\n", False),
    ("redis.port", "6379", True),
    ("nginx.listen", "80", True),
    ("nginx.listen", "127.0.0.1:8080", True),
    ("nginx.listen", "[::]:80", True),
    ("nginx.listen", "80 default_server", False),
    ("nginx.listen", "80; include /etc/shadow", False),
    ("nginx.listen", "::1:80", False),
    ("nginx.conf_dir", "/etc/nginx/conf.d", True),
    ("nginx.conf_dir", "etc/nginx", False),
    ("nginx.conf_dir", "/etc/nginx/../passwd", False),
    ("nginx.conf_dir", "/etc/nginx conf", False),
    ("nginx.test", "nginx -t", True),
    ("nginx.test", "if [ -f /x ]; then sleep 1; fi; nginx -t", True),   # runs on its own host
    ("nginx.test", "nginx -t\nreboot", False),
    ("mysql.admin", "mariadb --batch", True),
    ("redis.admin", " ", False),
    ("colour", "blue", False),
])
def test_settings_are_checked_by_shape(key, value, ok):
    assert (check_setting(key, value) == "") is ok, check_setting(key, value)


def test_hosts_and_ports():
    assert valid_host("shop.localhost") and not valid_host("123.456") and not valid_host("a..b")
    assert valid_port("1") and valid_port("65535") and not valid_port("+80") and not valid_port(" 80")
    assert url_host("::1") == "[::1]" and url_host("10.0.0.1") == "10.0.0.1"


def hello(**settings) -> pb.AgentMessage:
    return pb.AgentMessage(hello=pb.Hello(agent_id="a-rogue-1", roles=["daemons"],
                                          capabilities=["mysql", "nginx"], settings=settings))


def test_a_hello_with_a_malformed_setting_is_refused_in_one_line():
    problem = check_hello(hello(address=NGINX_BREAKOUT))
    assert problem.startswith("setting 'address' = ") and "\n" not in problem
    assert "IP address or a host name" in problem
    assert "port number" in check_hello(hello(**{"mysql.port": "3306; DROP"}))
    assert "PORT or HOST:PORT" in check_hello(hello(**{"nginx.listen": "80; include /etc/shadow"}))
    # Well-formed: accepted (what the agent may provide is the registry's business, not the hello's).
    assert check_hello(hello(**{"mysql.host": "10.0.0.9", "nginx.listen": "80"})) == ""
    # Names outside our sections mean nothing to the controller and are not checked.
    assert check_hello(hello(**{"x-label": "anything { }"})) == ""


def agent_args(**kw) -> argparse.Namespace:
    base = dict(config=None, id="web-1", controller="10.0.0.5:7710", role=["computing"], capability=None,
                state_dir=None, services_root=None, heartbeat_interval=None, provide=None, service_driver=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_the_agent_names_a_malformed_setting_when_it_starts():
    with pytest.raises(config_mod.ConfigError, match=r"provides.mysql.port: '3306 ; x': expected a port"):
        config_mod.load(agent_args(provide=["mysql.port=3306 ; x"]))
    with pytest.raises(config_mod.ConfigError, match=r"provides.nginx.colour: .*unknown setting"):
        config_mod.load(agent_args(provide=["nginx.colour=blue"]))
    config = config_mod.load(agent_args(provide=["mysql.port=3306", "nginx.listen=8080"]))
    assert dict(config.settings) == {"mysql.port": "3306", "nginx.listen": "8080"}


# ---------------------------------------------------------------- the nginx builder

ROUTE = [("/", "127.0.0.1", 20001)]


@pytest.mark.parametrize("domain, listen, routes, message", [
    ("shop.test", "80", [("/", NGINX_BREAKOUT, 20001)], "route host"),
    ("shop.test", "80", [("/", "127.0.0.1", 0)], "route port"),
    ("shop.test", "80", [("/", "127.0.0.1", "20001; }")], "route port"),
    ("shop.test", "80", [("/a { }", "127.0.0.1", 20001)], "route path"),
    ("shop.test", "80; server { }", ROUTE, "listen"),
    ("shop.test; }", "80", ROUTE, "server name"),
])
def test_the_nginx_builder_refuses_what_is_not_a_host_port_or_domain(domain, listen, routes, message):
    """Even if every check upstream were bypassed."""
    with pytest.raises(ops.RouteValueError, match=message):
        ops.nginx_config("shop/t1", domain, listen, routes)


def test_the_nginx_builder_writes_ipv6_upstreams_in_brackets():
    text = ops.nginx_config("shop/t1", "shop.test", "[::]:8080", [("/", "2001:db8::5", 20001)]).decode()
    assert "proxy_pass http://[2001:db8::5]:20001/;" in text and "listen [::]:8080;" in text


def nginx_accepts(tmp_path: Path, conf: bytes) -> tuple[bool, str]:
    (tmp_path / "conf.d").mkdir(exist_ok=True)
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / "conf.d" / "auto-shop-t1.conf").write_bytes(conf)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/logs/error.log;\nevents {{}}\n"
        f"http {{ access_log off; include {tmp_path}/conf.d/*.conf; }}\n")
    done = subprocess.run(["nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-t"],
                          capture_output=True, text=True)
    return done.returncode == 0, done.stderr


def test_without_the_checks_a_hello_address_adds_a_server_to_the_router(tmp_path, monkeypatch):
    """The attack as it was: the address went verbatim into proxy_pass, and nginx -t passed."""
    monkeypatch.setattr(ops, "_check_route_values", lambda *a: None)
    monkeypatch.setattr(ops, "url_host", lambda host: host)
    conf = ops.nginx_config("shop/t1", "shop.test", "8080", [("/", NGINX_BREAKOUT, 20001)])
    accepted, errors = nginx_accepts(tmp_path, conf)
    assert accepted, errors
    assert conf.count(b"server {") == 3 and b"return 200 owned" in conf
    monkeypatch.undo()
    with pytest.raises(ops.RouteValueError):
        ops.nginx_config("shop/t1", "shop.test", "8080", [("/", NGINX_BREAKOUT, 20001)])
    accepted, errors = nginx_accepts(tmp_path, ops.nginx_config("shop/t1", "shop.test", "8080", ROUTE))
    assert accepted, errors


# ---------------------------------------------------------------- grants in the registry

@pytest.mark.parametrize("peer, host", [
    ("ipv4:10.0.0.5:41234", "10.0.0.5"),
    ("ipv6:[::1]:41234", "::1"),
    ("ipv6:[::ffff:10.0.0.6]:41234", "10.0.0.6"),
    ("ipv6:[fe80::1%25eth0]:41234", "127.0.0.1"),
    ("unix:/run/deployer.sock", "127.0.0.1"),
    ("unix:", "127.0.0.1"),
    ("", "127.0.0.1"),
])
def test_the_address_of_a_link(peer, host):
    assert peer_host(peer) == host


def rogue_hello(**settings) -> pb.Hello:
    return pb.Hello(agent_id="a-rogue-1", roles=["daemons"], capabilities=["mysql", "nginx", "redis"],
                    version="x", heartbeat_interval_s=5, settings={"mysql.host": "10.66.66.66",
                                                                  "nginx.listen": "80", **settings})


def test_claims_count_only_once_granted_and_the_old_path_took_them(tmp_path):
    db = Database(tmp_path / "deployer.db")
    registry = Registry(db, 60)
    hello = rogue_hello(address="10.66.66.66")
    # Before: the registry copied capabilities and settings from the hello.
    old = Agent(id=hello.agent_id, roles=list(hello.roles), capabilities=list(hello.capabilities), version="x",
                facts=pb.HostFacts(), last_seen=0, state=CONNECTED, settings=dict(hello.settings))
    assert pick_agent(_Only(old), capability="mysql") is old
    assert pick_agent(_Only(old), capability="nginx") is old

    registry.attach(hello, "ipv4:192.0.2.8:5000")
    agent = registry.agents["a-rogue-1"]
    assert agent.capabilities == [] and "address" not in agent.settings and agent.address == "192.0.2.8"
    assert agent.ignored() == ["mysql", "nginx", "redis"]
    for capability in ("mysql", "nginx", "redis"):
        with pytest.raises(PlacementError, match=f"a-rogue-1 is configured for it but not granted it: "
                                                 f"deployctl agents grant a-rogue-1 --provides {capability}"):
            pick_agent(registry, capability=capability)

    registry.grant("a-rogue-1", ["mysql"], "")
    assert agent.capabilities == ["mysql"] and agent.settings == {"mysql.host": "10.66.66.66", "nginx.listen": "80"}
    assert pick_agent(registry, capability="mysql") is agent
    with pytest.raises(PlacementError):
        pick_agent(registry, capability="nginx")
    registry.grant("a-rogue-1", ["mysql"], "10.0.0.40")
    assert agent.address == "10.0.0.40"
    # Kept across a restart of the controller, and applied to the agent as it was last seen.
    db.close()
    again = Registry(Database(tmp_path / "deployer.db"), 60).agents["a-rogue-1"]
    assert again.capabilities == ["mysql"] and again.address == "10.0.0.40" and again.granted == ["mysql"]


def test_an_agent_known_before_a_restart_carries_its_backoff_as_grace_and_a_new_session_none(tmp_path):
    db = Database(tmp_path / "deployer.db")
    first = Registry(db, 3)
    first.attach(pb.Hello(agent_id="c-1", roles=["computing"], version="x"), "ipv4:127.0.0.1:1")
    lost = []
    # A controller started again: the agent backed off while it was away and may take its widest
    # window (16 s) to dial. It is lost after `lost_after` all the same (its operations end), but
    # it carries that window, which healing.py waits out before telling operators.
    again = Registry(db, 3)
    again.on_lost.append(lost.append)
    agent = again.agents["c-1"]
    assert agent.grace == RECONNECT_WINDOW_S
    agent.since -= 3.5
    again.sweep()
    assert agent.state == LOST and lost == ["c-1"]
    # Once it has been connected, a drop carries no grace.
    again.detach(again.attach(pb.Hello(agent_id="c-1", roles=["computing"], version="x"), "ipv4:127.0.0.1:1"))
    agent = again.agents["c-1"]
    assert agent.grace == 0 and agent.state == DISCONNECTED
    agent.since -= 3.5
    again.sweep()
    assert agent.state == LOST and lost == ["c-1", "c-1"]


def test_a_grant_of_nginx_does_not_give_what_was_never_claimed(tmp_path):
    registry = Registry(Database(tmp_path / "deployer.db"), 60)
    registry.attach(pb.Hello(agent_id="plain-1", roles=["computing"], version="x"), "ipv4:127.0.0.1:1")
    registry.grant("plain-1", ["nginx"], "")
    # The agent is not configured for nginx (it would not know where its files go): not used.
    assert registry.agents["plain-1"].capabilities == []


class _Only:
    def __init__(self, agent: Agent) -> None:
        self.agents = {agent.id: agent}


# ---------------------------------------------------------------- one owner per port

def test_every_listener_refuses_a_shared_port():
    assert ("grpc.so_reuseport", 0) in SERVER_OPTIONS and ("grpc.so_reuseport", 0) in ENROLL_OPTIONS


def test_without_the_option_two_grpc_servers_share_a_port():
    """The attack as it was: gRPC's default SO_REUSEPORT let a second server bind the port."""
    async def bound(options_first, options_second) -> tuple[int, int | str]:
        first = grpc.aio.server(options=options_first)
        port = first.add_insecure_port("127.0.0.1:0")
        await first.start()
        try:
            second = grpc.aio.server(options=options_second)
            try:
                return port, second.add_insecure_port(f"127.0.0.1:{port}")
            except RuntimeError:
                return port, "refused"
        finally:
            await first.stop(0)

    port, second = asyncio.run(bound(None, None))
    assert second == port          # both bound: the kernel would share connections between them
    assert asyncio.run(bound(SERVER_OPTIONS, None))[1] == "refused"
    assert asyncio.run(bound(None, SERVER_OPTIONS))[1] == "refused"


def test_a_taken_port_is_named_for_every_address_a_name_resolves_to():
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        assert port_taken(f"127.0.0.1:{port}") == f"127.0.0.1:{port}"
        # gRPC alone would serve `localhost` on ::1 and call it a success.
        assert port_taken(f"localhost:{port}") == f"127.0.0.1:{port}"
        assert port_taken(f"0.0.0.0:{port}") == f"0.0.0.0:{port}"
    assert port_taken(f"127.0.0.1:{port}") == ""
    assert port_taken("127.0.0.1:0") == ""


def test_a_live_operator_socket_is_never_taken(tmp_path):
    path = tmp_path / "control.sock"
    claim_socket(path)                                   # nothing there: fine
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen()
    try:
        with pytest.raises(StartupError, match="served by another process"):
            claim_socket(path)
        assert path.exists()
    finally:
        live.close()
    claim_socket(path)                                   # left by a dead process: removed
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(StartupError, match="exists and is not a socket"):
        claim_socket(path)
    assert path.read_text() == "not a socket"
