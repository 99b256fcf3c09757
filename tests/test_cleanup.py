"""A test run that fails, or is interrupted with Ctrl-C, leaves nothing of the tests' behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy_harness import mysql, redis
from tests.harness import ROOT, wait_for

pytestmark = pytest.mark.slow


def run_scenario(tmp_path: Path, interrupt: bool) -> tuple[dict, int]:
    report = tmp_path / "scenario.json"
    env = {**os.environ, "SCENARIO_REPORT": str(report), "DEPLOYER_TESTS_NO_SWEEP": "1"}
    if interrupt:
        env["SCENARIO_HANG"] = "1"
    child = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "tests/scenarios/failing_deploy.py"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        if interrupt:
            wait_for(lambda: Path(str(report) + ".deployed").exists() or child.poll() is not None, 600,
                     every=0.5, what="the scenario's deploy")
            assert child.poll() is None, child.stdout.read().decode()
            child.send_signal(signal.SIGINT)   # what Ctrl-C sends
        output = child.communicate(timeout=800)[0].decode()
    finally:
        if child.poll() is None:
            child.kill()
    assert Path(str(report) + ".deployed").exists(), output
    return json.loads(report.read_text()), child.returncode


def left_behind(env: str, base: str) -> list[str]:
    prefix = f"auto-shop-{env}"
    left = [f"database {n}" for n in mysql(f"SHOW DATABASES LIKE '{prefix}%'").split()]
    left += [f"MariaDB user {n}" for n in mysql(f"SELECT User FROM mysql.user WHERE User LIKE '{prefix}%'").split()]
    left += [f"ACL user {n}" for n in redis("ACL", "USERS").split() if n.startswith(prefix)]
    left += [f"key {k}" for k in redis("--scan", "--pattern", f"{prefix}*").split()]
    if subprocess.run(["id", "-u", prefix], capture_output=True).returncode == 0:
        left.append(f"Unix user {prefix}")
    if Path(base).exists():
        left.append(f"folder {base}")
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and base.encode() in (proc / "cmdline").read_bytes():
                left.append(f"process {proc.name}")
        except OSError:
            pass
    return left


@pytest.mark.timeout(900)   # a whole pytest run with a real deploy inside, on a busy machine
@pytest.mark.parametrize("interrupt", [False, True], ids=["failed", "ctrl-c"])
def test_a_failed_or_interrupted_run_leaves_nothing(tmp_path, interrupt):
    made, code = run_scenario(tmp_path, interrupt)
    assert code != 0                                   # it did fail (1) or was interrupted (2)
    wait_for(lambda: not left_behind(made["env"], made["base"]), 30, every=0.5,
             what=f"nothing of {made['env']} left: {left_behind(made['env'], made['base'])}")
