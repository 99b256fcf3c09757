"""The systemd service driver: its template unit (verified by systemd-analyze), the per-instance
environment file and log drop-in, the choice of driver; and, marked `systemd`, the driver for real
(start, list, logs, stop, limits) under the bare systemd of `make test`'s systemd pass, where the
deploy, day-2 and recovery tests also run once more with this driver (tests/run.py)."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from agent import config as config_mod
from agent import limits as limits_mod
from agent.main import choose_driver
from agent.services import Supervisor
from agent.systemd_driver import SystemdDriver, dropin_log_path, instance_env, log_dropin, parse_note, template_unit
from protos import deployer_pb2 as pb
from tests.test_deploy_units import problems, verify


@pytest.mark.parametrize("user", ["", "auto-shop-prod"])
def test_template_unit_verifies(tmp_path, user):
    env_dir = tmp_path / "services"
    env_dir.mkdir()
    template = tmp_path / "auto-shop-prod-web@.service"
    template.write_text(template_unit(env_dir, user, exits=str(tmp_path / "exits.sock")))
    assert "\nExecStopPost=+" in template.read_text() and f"exitnote.py {tmp_path}/exits.sock %p %i\n" in template.read_text()
    assert (f"User={user}\nGroup={user}\n" in template.read_text()) == bool(user)
    (env_dir / "auto-shop-prod-web@3-20001.env").write_text('DEPLOYER_CWD="/tmp"\nDEPLOYER_COMMAND="true"\n')
    instance = tmp_path / "auto-shop-prod-web@3-20001.service"
    instance.symlink_to(template)
    result = verify(instance)
    assert result.returncode == 0, result.stdout + result.stderr
    assert problems(result, instance) == []


def test_instance_environment_is_quoted_for_systemd_and_never_reads_the_release(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text('DATABASE_URL=mysql://u:p"q\\r$x@h:3306/d\nNODE_ENV=production\n')
    spec = pb.ServiceStartSpec(name="auto-shop-prod-web", instance="3-20001",
                               argv=["sh", "-c", "exec node server.js"], cwd="/srv/x/releases/3/web",
                               env={"PORT": "20001", "ODD": 'a "b" $c'}, env_file=str(env_file))
    lines = instance_env(spec).splitlines()
    assert 'DEPLOYER_COMMAND="exec node server.js"' in lines
    assert 'DEPLOYER_CWD="/srv/x/releases/3/web"' in lines
    assert f'DEPLOYER_ENV_FILE="{env_file}"' in lines and 'DEPLOYER_KEEP="ODD,PORT"' in lines
    assert 'PORT="20001"' in lines and 'ODD="a \\"b\\" \\$c"' in lines
    # The launcher reads the .env as the service's user; the root-read file never holds it.
    assert not any("DATABASE_URL" in line or "NODE_ENV" in line for line in lines)


def test_the_unit_starts_the_launcher_and_never_names_the_release_env(tmp_path):
    unit = template_unit(tmp_path, "auto-shop-prod", python="/usr/bin/python3", launcher="/opt/d/agent/launcher.py")
    assert unit.count("EnvironmentFile=") == 1 and f"EnvironmentFile={tmp_path}/%p@%i.env" in unit
    assert "ExecStart=/usr/bin/python3 -I -S -B /opt/d/agent/launcher.py --cwd=${DEPLOYER_CWD} " in unit
    assert "-- /bin/sh -c ${DEPLOYER_COMMAND}" in unit and "WorkingDirectory" not in unit


def test_an_exit_note_says_what_the_supervisor_would():
    def note(**fields) -> bytes:
        return json.dumps({"name": "auto-shop-prod-web", "instance": "3-20001", **fields}).encode()
    exited = parse_note(note(result="exit-code", code="exited", status="3"))
    assert (exited.name, exited.instance, exited.exit_code, exited.signal) == ("auto-shop-prod-web", "3-20001", 3, 0)
    assert parse_note(note(result="signal", code="killed", status="KILL")).signal == 9
    assert parse_note(note(result="core-dump", code="dumped", status="11")).signal == 11
    assert parse_note(note(result="timeout", code="", status="")).exit_code == -1
    assert parse_note(b"not json") is None and parse_note(b'{"name": "x"}') is None


def test_the_log_dropin_appends_to_the_operation_s_file_and_reads_back():
    text = log_dropin("/srv/services/auto-shop-prod-web/logs/100%.log")
    assert text == ("[Service]\nStandardOutput=append:/srv/services/auto-shop-prod-web/logs/100%%.log\n"
                    "StandardError=append:/srv/services/auto-shop-prod-web/logs/100%%.log\n")
    assert dropin_log_path(text) == "/srv/services/auto-shop-prod-web/logs/100%.log"
    for bad in ("logs/1.log", "/srv/x\nExecStartPre=/bin/evil"):
        with pytest.raises(Exception, match="invalid log path"):
            log_dropin(bad)


def test_driver_choice(tmp_path):
    def config(driver: str) -> config_mod.AgentConfig:
        return config_mod.AgentConfig(id="a", controller="x:1", roles=("computing",),
                                      state_dir=tmp_path, service_driver=driver)
    assert isinstance(choose_driver(config("supervisor")), Supervisor)
    assert isinstance(choose_driver(config("systemd")), SystemdDriver)
    # On these machines systemd is not PID 1, so `auto` means the built-in supervisor.
    assert isinstance(choose_driver(config("auto")), Supervisor)
    bad = argparse.Namespace(config=None, id="a", controller="x:1", role=["computing"], capability=None,
                             state_dir=None, services_root=None, heartbeat_interval=None, provide=None,
                             service_driver="docker")
    with pytest.raises(config_mod.ConfigError, match="service_driver must be auto, systemd or supervisor"):
        config_mod.load(bad)


# ---------------------------------------------------------------- for real, under a bare systemd
# These run in the systemd pass of `make test` (tests/run.py), where systemd is PID 1.

def _unit_show(unit: str, *props: str) -> dict[str, str]:
    import subprocess
    out = subprocess.run(["systemctl", "show", unit, "-p", ",".join(props)], capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture
def tenant(tmp_path):
    """A test environment's Unix user and its service folder, removed afterwards."""
    import os
    import subprocess

    import pwd
    import shutil

    from tests.deploy_harness import remove_limits_group, service_users_base, unique_env
    user = f"auto-sd-{unique_env()}"
    base = service_users_base("deployer-systemd-")   # folders the service's user can pass through
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user], check=True)
    try:
        work = base / "release"
        work.mkdir()
        os.chown(work, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        yield user, work
    finally:
        subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True)
        subprocess.run(["userdel", "--force", user], capture_output=True)
        remove_limits_group(user)
        shutil.rmtree(base, ignore_errors=True)


def _start_spec(user: str, work, command: str, instance: str, limits: pb.Limits | None = None) -> pb.ServiceStartSpec:
    spec = pb.ServiceStartSpec(name=f"{user}-web", instance=instance, argv=["sh", "-c", command], cwd=str(work),
                               env={"PORT": "20001"}, user=user, log_path=str(work.parent / "logs" / "1.log"))
    if limits is not None:
        spec.limits.CopyFrom(limits)
    return spec


@pytest.mark.systemd
def test_start_list_logs_and_stop_for_real(tmp_path, tenant):
    import asyncio
    import pwd

    import psutil

    from tests.harness import wait_for
    user, work = tenant
    (work / ".env").write_text("GREETING=hello from the release\n")
    driver = SystemdDriver(tmp_path / "state")
    spec = _start_spec(user, work, 'echo "$GREETING on $PORT as $(id -un)"; exec sleep 300', "1-20001")
    result = asyncio.run(driver.start("op-1", spec))
    spec.env_file = ""
    assert result.outcome == pb.EXITED and not result.error, result.error

    [entry] = driver.list(f"{user}-")
    assert (entry["name"], entry["instance"], entry["alive"]) == (f"{user}-web", "1-20001", True)
    assert entry["log_path"] == str(work.parent / "logs" / "1.log")
    process = psutil.Process(entry["pid"])
    assert process.uids().real == pwd.getpwnam(user).pw_uid               # systemd's User=, then the launcher
    assert f"/{user}-web@1-20001.service" in open(f"/proc/{entry['pid']}/cgroup").read()
    log = work.parent / "logs" / "1.log"
    wait_for(lambda: log.exists() and f"on 20001 as {user}" in log.read_text(), 20, what="the service's output")
    assert _unit_show(f"{user}-web@1-20001.service", "Restart")["Restart"] == "no"  # no initiative of its own

    stopped = asyncio.run(driver.stop("op-2", pb.ServiceStopSpec(name=f"{user}-web", instance="1-20001")))
    assert stopped.outcome == pb.EXITED and not stopped.error, stopped.error
    assert not psutil.pid_exists(entry["pid"]) or psutil.Process(entry["pid"]).status() == psutil.STATUS_ZOMBIE
    assert driver.list(f"{user}-") == []
    assert not (driver.unit_dir / f"{user}-web@1-20001.service.d").exists()


@pytest.mark.systemd
def test_an_end_nobody_ordered_is_said_at_once_and_an_ordered_stop_is_not(tmp_path, tenant):
    import asyncio
    import os
    import signal

    user, work = tenant
    driver = SystemdDriver(tmp_path / "state")
    heard: list[pb.ServiceExited] = []
    driver.on_exit = heard.append

    async def scenario():
        watching = asyncio.create_task(driver.watch())
        await asyncio.sleep(0.2)
        for instance in ("1-20005", "1-20006"):
            spec = _start_spec(user, work, "exec sleep 300", instance)
            assert (await driver.start("op-1", spec)).outcome == pb.EXITED
        pid = {e["instance"]: e for e in driver.list(f"{user}-")}["1-20005"]["pid"]
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.05)
        await driver.stop("op-2", pb.ServiceStopSpec(name=f"{user}-web", instance="1-20006"))
        await asyncio.sleep(1.0)
        await driver.stop("op-3", pb.ServiceStopSpec(name=f"{user}-web", instance="1-20005"))
        await asyncio.sleep(0.5)
        watching.cancel()

    asyncio.run(scenario())
    assert [(e.name, e.instance, e.signal) for e in heard] == [(f"{user}-web", "1-20005", 9)]


@pytest.mark.systemd
def test_output_is_stamped_line_by_line_into_files_of_its_own_and_the_writer_ends_with_the_instance(tmp_path,
                                                                                                     tenant):
    import asyncio
    import time

    import psutil

    from agent import logfiles
    from tests.harness import wait_for
    user, work = tenant
    logs = work.parent / "logs"
    driver = SystemdDriver(tmp_path / "state")
    spec = _start_spec(user, work, 'printf "first\\nsecond no newline"; sleep 2; echo; echo third >&2; exec sleep 300',
                       "1-20007")
    # Left without its newline for longer than the writer waits (1 s), a line is written as a piece.
    spec.log_dir, spec.log_file_bytes, spec.log_keep_bytes = str(logs / "1"), 1 << 20, 8 << 20
    assert asyncio.run(driver.start("op-1", spec)).outcome == pb.EXITED
    writer = driver.writers[-1]

    def records():
        return [r for f in logfiles.files_of(str(logs)) for r in logfiles._records(f[3], b"", b"", f[0])]
    wait_for(lambda: len(records()) >= 4, 20, what="the stamped lines")
    lines = [r[2] for r in records()]
    assert lines[:2] == [b"first\n", b"second no newline"] and b"third\n" in lines, lines
    stamps = [r[0] for r in records()]
    assert stamps == sorted(stamps) and all(len(s) == 27 for s in stamps)
    assert psutil.Process(writer.pid).status() != psutil.STATUS_ZOMBIE
    asyncio.run(driver.stop("op-2", pb.ServiceStopSpec(name=f"{user}-web", instance="1-20007")))
    deadline = time.monotonic() + 10
    while writer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert writer.poll() == 0  # it ended with its instance


@pytest.mark.systemd
def test_a_process_that_exits_at_once_fails_its_start_naming_the_log(tmp_path, tenant):
    import asyncio
    user, work = tenant
    driver = SystemdDriver(tmp_path / "state")
    spec = _start_spec(user, work, "echo about to fail; exit 3", "1-20002")
    result = asyncio.run(driver.start("op-1", spec))
    assert result.outcome == pb.FAILED_TO_START, result
    assert f"{user}-web@1-20002.service is failed" in result.error and spec.log_path in result.error
    assert "about to fail" in (work.parent / "logs" / "1.log").read_text()
    [entry] = driver.list(f"{user}-")
    assert entry["alive"] is False
    asyncio.run(driver.stop("op-2", pb.ServiceStopSpec(name=f"{user}-web", instance="1-20002")))


@pytest.mark.systemd
def test_limits_are_the_slice_s_and_a_process_over_its_memory_is_killed(tmp_path, tenant):
    import asyncio
    import subprocess

    from tests.harness import wait_for
    user, work = tenant
    driver = SystemdDriver(tmp_path / "state")
    limits = pb.Limits(group=user, memory_bytes=64 << 20, cpu=0.5, processes=32)
    spec = _start_spec(user, work, "exec sleep 300", "1-20003", limits)
    assert asyncio.run(driver.start("op-1", spec)).outcome == pb.EXITED
    [entry] = driver.list(f"{user}-", group=user)
    assert f"/{user}.slice/" in open(f"/proc/{entry['pid']}/cgroup").read()
    shown = _unit_show(f"{user}.slice", "MemoryMax", "TasksMax", "CPUQuotaPerSecUSec")
    assert (shown["MemoryMax"], shown["TasksMax"], shown["CPUQuotaPerSecUSec"]) == (str(64 << 20), "32", "500ms")
    assert entry["limits_use"]["memory_max_bytes"] == 64 << 20 and entry["limits_use"]["processes_max"] == 32

    hog = _start_spec(user, work, "exec python3 -c 'b = bytearray(256 << 20); import time; time.sleep(300)'",
                      "1-20004", limits)
    asyncio.run(driver.start("op-2", hog))   # it may die before or after the start's short watch
    wait_for(lambda: not {e["instance"]: e for e in driver.list(f"{user}-", group=user)}["1-20004"]["alive"], 30,
             what="the memory hog killed")
    hogged = {e["instance"]: e for e in driver.list(f"{user}-", group=user)}["1-20004"]
    assert hogged.get("error") in ("killed by signal 9", limits_mod.oom_message(64 << 20)), hogged
    assert {e["instance"]: e for e in driver.list(f"{user}-", group=user)}["1-20003"]["alive"]  # the other lives

    # A command of the environment (a build, a migration) runs in a scope of the same slice.
    confined = limits_mod.confine(limits, "op-3", ["cat", "/proc/self/cgroup"])
    try:
        out = subprocess.run(confined.argv, capture_output=True, text=True, env={**os.environ, **confined.env},
                             timeout=60)
    finally:
        confined.leaf.release()
    assert out.returncode == 0 and f"/{user}.slice/{user}-op-3.scope" in out.stdout, out.stdout + out.stderr
    for instance in ("1-20003", "1-20004"):
        asyncio.run(driver.stop("op-9", pb.ServiceStopSpec(name=f"{user}-web", instance=instance)))


def test_units_an_earlier_agent_left_in_etc_are_retired_and_nothing_else(tmp_path, monkeypatch):
    import subprocess
    old = tmp_path / "etc"
    old.mkdir()
    (old / "auto-shop-prod-web@.service").write_text(template_unit(tmp_path, "auto-shop-prod"))
    (old / "auto-shop-prod.slice").write_text(limits_mod.slice_unit(pb.Limits(group="auto-shop-prod", cpu=1)))
    (old / "auto-backup.service").write_text("[Unit]\nDescription=the operator's own\n[Service]\nExecStart=/bin/true\n")
    (old / "nginx.service").write_text("[Unit]\nDescription=x (started by the deployer agent)\n")
    (old / "auto-link.service").symlink_to(old / "auto-shop-prod-web@.service")
    reloads = []
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: reloads.append(argv))
    removed = SystemdDriver(tmp_path / "state", tmp_path / "run").retire_old_units(old)
    assert removed == ["auto-shop-prod-web@.service", "auto-shop-prod.slice"]
    assert sorted(p.name for p in old.iterdir()) == ["auto-backup.service", "auto-link.service", "nginx.service"]
    assert reloads == [["systemctl", "daemon-reload"]]
