"""The systemd service driver's pure parts: its template unit (verified by systemd-analyze), the
per-instance environment file, and the choice of driver. Starting units needs systemd as PID 1,
which the test machines do not have; the supervisor is exercised end to end instead."""

from __future__ import annotations

import argparse

import pytest

from agent import config as config_mod
from agent.main import choose_driver
from agent.services import Supervisor
from agent.systemd_driver import SystemdDriver, instance_env, template_unit
from protos import deployer_pb2 as pb
from tests.test_deploy_units import problems, verify


@pytest.mark.parametrize("user", ["", "auto-shop-prod"])
def test_template_unit_verifies(tmp_path, user):
    env_dir = tmp_path / "services"
    env_dir.mkdir()
    template = tmp_path / "auto-shop-prod-web@.service"
    template.write_text(template_unit(env_dir, user))
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
