"""The route switch against a real nginx: all or nothing, and done only once nginx answers from
the new files — no worker from before the reload still accepting connections, and every route
answered, through nginx's own listen address, by the instance the new file names."""

from __future__ import annotations

import http.client
import http.server
import secrets
import subprocess
import threading
from pathlib import Path

import pytest

from controller.environments import commands
from controller.environments.commands import nginx_remove_script, nginx_switch_script
from tests.deploy_harness import Nginx
from tests.harness import free_port, wait_for


def server_block(port: int, name: str, body: str) -> str:
    return f'server {{ listen {port}; server_name {name}; return 200 "{body}"; }}\n'


def answer(port: int, host: str, path: str = "/") -> str:
    """The body nginx gives `host` on a fresh connection (a new connection is what an old worker
    that still listens would take)."""
    return fetch(port, host, path)[1]


def fetch(port: int, host: str, path: str = "/") -> tuple[dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host, "Connection": "close"})
        response = conn.getresponse()
        return {k.lower(): v for k, v in response.getheaders()}, response.read().decode()
    finally:
        conn.close()


@pytest.fixture
def nginx(tmp_path):
    server = Nginx(tmp_path)
    # Another environment's block comes first, so it is nginx's default server: what a host
    # name without a block of its own is answered by.
    (server.conf_dir / "auto-other-prod.conf").write_text(server_block(server.port, "other.test", "other"))
    server.start()
    yield server
    server.stop()


def switch(nginx: Nginx, name: str, content: str, test: str | None = None, reload: str | None = None,
           pid_file: str | None = None, check: str = "") -> subprocess.CompletedProcess:
    settings = nginx.settings()
    conf = nginx.conf_dir / f"{name}.conf"
    staged = nginx.conf_dir / f"{name}.conf.staged-job-1"
    staged.write_text(content)
    return subprocess.run(["sh", "-c", nginx_switch_script(str(conf), str(staged), test or settings["nginx.test"],
                                                            reload or settings["nginx.reload"],
                                                            pid_file or settings["nginx.pid"], check)],
                          capture_output=True, text=True, timeout=60)


def test_a_first_route_is_answered_by_its_own_block_as_soon_as_the_switch_returns(nginx):
    for round_ in range(5):
        name = f"auto-shop-t{round_}"
        result = switch(nginx, name, server_block(nginx.port, f"t{round_}.test", name))
        assert result.returncode == 0, result.stderr
        # Not one answer from the default server (the other environment) once the switch is done.
        assert [answer(nginx.port, f"t{round_}.test") for _ in range(20)] == [name] * 20


def test_a_changed_route_is_answered_by_the_new_file_as_soon_as_the_switch_returns(nginx):
    for round_ in range(5):
        result = switch(nginx, "auto-shop-prod", server_block(nginx.port, "shop.test", f"release {round_}"))
        assert result.returncode == 0, result.stderr
        assert {answer(nginx.port, "shop.test") for _ in range(20)} == {f"release {round_}"}


@pytest.mark.parametrize("test, reload, why", [
    ("false", None, "nginx rejected the new configuration"),
    (None, "false", "nginx could not reload"),
])
def test_a_refused_switch_puts_the_old_file_back(nginx, test, reload, why):
    assert switch(nginx, "auto-shop-prod", server_block(nginx.port, "shop.test", "old")).returncode == 0
    result = switch(nginx, "auto-shop-prod", server_block(nginx.port, "shop.test", "new"), test=test, reload=reload)
    assert result.returncode == 1 and why in result.stderr
    assert (nginx.conf_dir / "auto-shop-prod.conf").read_text() == server_block(nginx.port, "shop.test", "old")
    assert sorted(p.name for p in nginx.conf_dir.iterdir()) == ["auto-other-prod.conf", "auto-shop-prod.conf"]
    assert answer(nginx.port, "shop.test") == "old"


def test_a_master_that_cannot_take_the_files_fails_the_switch(nginx, tmp_path):
    """`nginx -t` passes, the signal is delivered, yet the master keeps its old workers: a listen
    on a port another process holds. The switch fails and the old file is back."""
    import socket
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        assert switch(nginx, "auto-shop-prod", server_block(nginx.port, "shop.test", "old")).returncode == 0
        test = "true"   # nginx -t would refuse the taken port; a master can meet it at reload time too
        content = server_block(nginx.port, "shop.test", "new") + server_block(taken, "shop.test", "new")
        result = switch(nginx, "auto-shop-prod", content, test=test)
        assert result.returncode == 1, result.stdout
        assert "did not take the new configuration" in result.stderr
        assert answer(nginx.port, "shop.test") == "old"
    finally:
        holder.close()


def test_a_switch_without_a_running_nginx_says_so(nginx, tmp_path):
    result = switch(nginx, "auto-shop-prod", server_block(nginx.port, "shop.test", "new"),
                    pid_file=str(tmp_path / "nope.pid"))
    assert result.returncode == 1 and "no nginx master process named in" in result.stderr
    assert not (nginx.conf_dir / "auto-shop-prod.conf").exists()


def test_a_process_name_cannot_pass_for_an_nginx_worker(nginx, tmp_path):
    """A tenant's process may name itself anything, parentheses and numbers included; the wait
    reads the parent from after the last parenthesis, so such a name changes nothing."""
    master = (nginx.prefix / "nginx.pid").read_text().strip()
    fake = subprocess.Popen(["python3", "-c", f"import ctypes,time; ctypes.CDLL(None).prctl(15, b'x) S {master} 1', 0, 0, 0);"
                             "time.sleep(60)"])
    try:
        def naive_parent() -> str:
            stat = Path(f"/proc/{fake.pid}/stat").read_text()
            return stat.split()[3] if "x)" in stat else ""
        wait_for(lambda: naive_parent() == master, what="the process named to look like a worker")
        result = switch(nginx, "auto-shop-prod", server_block(nginx.port, "shop.test", "new"))
        assert result.returncode == 0, result.stderr
        assert answer(nginx.port, "shop.test") == "new"
    finally:
        fake.kill()
        fake.wait()


def test_removing_a_route_waits_until_no_worker_serves_it(nginx):
    assert switch(nginx, "auto-shop-prod", server_block(nginx.port, "shop.test", "shop")).returncode == 0
    settings = nginx.settings()
    conf = nginx.conf_dir / "auto-shop-prod.conf"
    result = subprocess.run(["sh", "-c", nginx_remove_script(str(conf), settings["nginx.reload"], settings["nginx.pid"])],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not conf.exists()
    assert {answer(nginx.port, "shop.test") for _ in range(20)} == {"other"}


# ---------------------------------------------------------------- the check through nginx

@pytest.fixture
def app():
    """Tiny upstreams in threads, each answering every request with its name (and noting the
    paths it was asked for)."""
    servers = []

    def start(name: str) -> tuple[int, list[str]]:
        asked: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                asked.append(self.path)
                body = name.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server.server_address[1], asked

    start.servers = servers  # a test may stop one
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def route_switch(nginx: Nginx, routes: list[tuple[str, int]], new: set[str], **kw) -> subprocess.CompletedProcess:
    """The switch of shop/prod (shop.test) as the controller builds it: the file with a fresh
    probe, and the check of every route (path, port on 127.0.0.1); those in `new` go to a new
    instance."""
    probe = secrets.token_hex(16)
    upstreams = [(path, "127.0.0.1", port) for path, port in routes]
    content = commands.nginx_config("shop/prod", "shop.test", str(nginx.port), upstreams, probe=probe).decode()
    check = commands.nginx_check_function("router-1", str(nginx.port), "shop.test", probe,
                                          [(path, host, port, path in new) for path, host, port in upstreams])
    return switch(nginx, "auto-shop-prod", content, check=check, **kw)


@pytest.fixture
def quick(monkeypatch):
    """A check that gives up after 1 s instead of 10: the failures below are definite."""
    monkeypatch.setattr(commands, "NGINX_ANSWER_S", 1)


def test_the_check_passes_once_nginx_answers_every_route_from_its_new_instance(nginx, app):
    (old, _), (web, web_asked), (api, api_asked) = app("old"), app("web"), app("api")
    first = route_switch(nginx, [("/", old)], new={"/"})
    assert first.returncode == 0, first.stderr
    result = route_switch(nginx, [("/", web), ("/api", api)], new={"/", "/api"})
    assert result.returncode == 0, result.stderr
    assert [answer(nginx.port, "shop.test") for _ in range(20)] == ["web"] * 20
    assert answer(nginx.port, "shop.test", "/api/") == "api"
    # Each instance was asked for its route's own root, as a client's request for the route would be.
    assert web_asked[0] == "/" and api_asked[0] == "/"
    # Ordinary clients never see the header, nor can they reach a probe without the nonce.
    headers, body = fetch(nginx.port, "shop.test", "/api/.deployer-probe-" + "0" * 32)
    assert body == "api" and "x-deployer-upstream" not in headers
    assert "x-deployer-upstream" not in fetch(nginx.port, "shop.test", "/")[0]
    assert not (nginx.conf_dir / "auto-shop-prod.conf.previous").exists()


def test_replicas_share_one_upstream_each_checked_and_one_that_goes_away_is_skipped(nginx, app, quick):
    """`replicas: 2`: one least_conn upstream for the path, each replica asked at its own probe
    during the switch, and a replica that stops answering is passed over (proxy_next_upstream),
    then left out for a while (max_fails), so clients keep getting answers."""
    (one, one_asked), (two, two_asked) = app("one"), app("two")
    result = route_switch(nginx, [("/", one), ("/", two)], new={"/"})
    assert result.returncode == 0, result.stderr
    conf = (nginx.conf_dir / "auto-shop-prod.conf").read_text()
    assert conf.count("least_conn;") == 1 and f"server 127.0.0.1:{one} max_fails=1" in conf
    assert one_asked and two_asked  # each replica was asked through nginx before the switch ended
    assert set(answer(nginx.port, "shop.test") for _ in range(20)) == {"one", "two"}
    app.servers[1].shutdown()
    app.servers[1].server_close()   # "two" goes away: every request is still answered, by "one"
    assert [answer(nginx.port, "shop.test") for _ in range(20)] == ["one"] * 20
    # A replica that is not there fails the switch, naming it; the previous file is back.
    gone = free_port()
    refused = route_switch(nginx, [("/", one), ("/", gone)], new={"/"})
    assert refused.returncode == commands.NOT_ANSWERED and f"127.0.0.1:{gone}" in refused.stderr, refused.stderr
    assert f"server 127.0.0.1:{two} " in (nginx.conf_dir / "auto-shop-prod.conf").read_text()
    app.servers.pop(1)


@pytest.mark.parametrize("kept", ["refusing", "hung"])
def test_a_route_kept_as_it_was_needs_only_its_address(nginx, app, kept, monkeypatch):
    """A route that is not switched must still go where the ledger says; whether its instance
    answers is that service's own business (a deploy of another must not fail on it). One that
    accepts and never answers gets nginx's own 504 at the probe location, within the bound."""
    import socket
    monkeypatch.setattr(commands, "PROBE_READ_S", 1)
    api, _ = app("api")
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)          # connections are accepted by the kernel, and never answered
        kept_port = hung.getsockname()[1] if kept == "hung" else free_port()
        result = route_switch(nginx, [("/", kept_port), ("/api", api)], new={"/api"})
    assert result.returncode == 0, result.stderr
    assert answer(nginx.port, "shop.test", "/api/") == "api"


def test_a_switch_fails_when_the_nginx_on_the_listen_address_is_not_the_one_reloaded(nginx, app, tmp_path, quick):
    """The router's reload and pid settings name another nginx (an old instance still holds the
    port, say): that one reloads and its workers turn over, so the wait of decision 022 is
    satisfied, yet the nginx clients reach still runs the old file. Only asking it shows that."""
    (old, _), (new, _) = app("old"), app("new")
    assert route_switch(nginx, [("/", old)], new={"/"}).returncode == 0
    before = (nginx.conf_dir / "auto-shop-prod.conf").read_text()
    decoy = Nginx(tmp_path / "decoy")
    (decoy.conf_dir / "decoy.conf").write_text(server_block(decoy.port, "decoy.test", "decoy"))
    decoy.start()
    try:
        settings = decoy.settings()
        result = route_switch(nginx, [("/", new)], new={"/"}, reload=settings["nginx.reload"],
                              pid_file=settings["nginx.pid"])
    finally:
        decoy.stop()
    assert result.returncode == commands.NOT_ANSWERED, result.stderr
    assert result.stderr.strip() == (
        "nginx on router-1 still answers / of shop.test from an older file or another server block (HTTP 200), "
        f"not from the new instance 127.0.0.1:{new}; the previous configuration is back")
    assert (nginx.conf_dir / "auto-shop-prod.conf").read_text() == before
    assert sorted(p.name for p in nginx.conf_dir.iterdir()) == ["auto-other-prod.conf", "auto-shop-prod.conf"]
    assert answer(nginx.port, "shop.test") == "old"


def test_a_switch_fails_when_another_server_block_takes_the_host_name(nginx, app, quick):
    """A hand-written file that nginx reads first claims the same name: `nginx -t` only warns,
    the reload works, and nginx answers the name from that block, not from the new file."""
    (nginx.conf_dir / "auto-aaa.conf").write_text(server_block(nginx.port, "shop.test", "squatter"))
    new, _ = app("new")
    result = route_switch(nginx, [("/api", new)], new={"/api"})
    assert result.returncode == commands.NOT_ANSWERED, result.stderr
    assert result.stderr.strip() == (
        "nginx on router-1 still answers /api/ of shop.test from an older file or another server block (HTTP 200), "
        f"not from the new instance 127.0.0.1:{new}; the previous configuration is back")
    assert not (nginx.conf_dir / "auto-shop-prod.conf").exists()   # there was none before
    assert sorted(p.name for p in nginx.conf_dir.iterdir()) == ["auto-aaa.conf", "auto-other-prod.conf"]


def test_a_new_instance_nginx_cannot_reach_fails_the_switch(nginx, app, quick):
    """nginx routes to the new instance, but its own 502 is no answer from the app."""
    old, _ = app("old")
    assert route_switch(nginx, [("/", old)], new={"/"}).returncode == 0
    gone = free_port()
    result = route_switch(nginx, [("/", gone)], new={"/"})
    assert result.returncode == commands.NOT_ANSWERED, result.stderr
    assert result.stderr.strip() == (
        f"nginx on router-1 routes / of shop.test to the new instance 127.0.0.1:{gone}, which did not answer "
        "(HTTP 502 from nginx); the previous configuration is back")
    assert answer(nginx.port, "shop.test") == "old"
