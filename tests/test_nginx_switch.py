"""The route switch against a real nginx: all or nothing, and done only once nginx answers from
the new files — no worker from before the reload still accepting connections."""

from __future__ import annotations

import http.client
import shutil
import subprocess
from pathlib import Path

import pytest

from controller.environments.commands import nginx_remove_script, nginx_switch_script
from tests.deploy_harness import Nginx
from tests.harness import wait_for


def server_block(port: int, name: str, body: str) -> str:
    return f'server {{ listen {port}; server_name {name}; return 200 "{body}"; }}\n'


def answer(port: int, host: str) -> str:
    """The body nginx gives `host` on a fresh connection (a new connection is what an old worker
    that still listens would take)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": host, "Connection": "close"})
        return conn.getresponse().read().decode()
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
           pid_file: str | None = None) -> subprocess.CompletedProcess:
    settings = nginx.settings()
    conf = nginx.conf_dir / f"{name}.conf"
    staged = nginx.conf_dir / f"{name}.conf.staged-job-1"
    staged.write_text(content)
    return subprocess.run(["sh", "-c", nginx_switch_script(str(conf), str(staged), test or settings["nginx.test"],
                                                            reload or settings["nginx.reload"],
                                                            pid_file or settings["nginx.pid"])],
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
