"""The layer between the pure planner and the real world, as tables (tests/data/): builder
inputs → the exact SQL, script or operation sent to an agent; captured agent outputs → facts;
facts → verify's findings and warnings. A change to what is sent shows here as a diff of data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from google.protobuf import json_format

from controller.environments import commands, recovery, verify
from controller.environments.facts import HostFolders, MysqlNames, NginxFile, Releases, RouteFiles, ServiceProcesses

DATA = Path(__file__).resolve().parent / "data"
BUILDERS = json.loads((DATA / "commands.json").read_text())
FACTS = json.loads((DATA / "facts.json").read_text())


def shown(value):
    if isinstance(value, bytes):
        return {"text": value.decode()}
    if hasattr(value, "DESCRIPTOR"):
        return {"message": json_format.MessageToDict(value)}
    if isinstance(value, tuple):
        return list(value)
    return value


@pytest.mark.parametrize("case", BUILDERS, ids=[f"{c['builder']}-{i}" for i, c in enumerate(BUILDERS)])
def test_a_builder_makes_exactly_this(case):
    module, _, name = case["builder"].partition(".")
    builder = getattr({"commands": commands}[module], name)
    expected = case["expected"]
    if isinstance(expected, dict) and "error" in expected:
        with pytest.raises(Exception) as raised:
            builder(*case["args"], **case["kwargs"])
        assert f"{type(raised.value).__name__}: {raised.value}" == expected["error"]
    else:
        assert shown(builder(*case["args"], **case["kwargs"])) == expected


@pytest.mark.parametrize("case", FACTS, ids=[f"{c['fact']}-{i}" for i, c in enumerate(FACTS)])
def test_a_fact_reads_exactly_this(case):
    fact, expected = case["fact"], case["expected"]
    if fact == "ServiceProcesses":
        assert [dataclasses.asdict(p) for p in ServiceProcesses.parse(case["output"], case["unit"])] == expected
    elif fact == "NginxFile":
        assert NginxFile.parse(case["output"]) == expected
    elif fact == "routed_to":
        found = recovery.routed_to(case["conf"], case["path"])
        assert [list(w) for w in found] == expected
    elif fact == "probe_of":
        assert commands.probe_of(case["conf"]) == expected
    elif fact == "scripting_allowed":
        assert verify.scripting_allowed(case["rules"]) is expected
    elif fact == "acl_list":
        facts = verify.Facts()
        verify.read_acl_list(case["output"], facts)
        found = {"redis_users": facts.redis_users, "redis_scripting": sorted(facts.redis_scripting),
                 "redis_default_open": facts.redis_default_open, "warnings": verify.warnings(facts)}
        if "redis_channels" in expected:
            found["redis_channels"] = facts.redis_channels
        assert found == expected
    elif fact == "RouteFiles":
        assert RouteFiles.parse(case["output"]) == expected
    elif fact == "HostFolders":
        folders, user = HostFolders.parse(case["output"])
        assert {"folders": folders, "user": user} == expected
    elif fact == "Releases":
        assert {s: dataclasses.asdict(r) for s, r in Releases.parse(case["output"]).items()} == expected
    elif fact == "MysqlNames":
        databases, users = MysqlNames.parse(case["output"])
        assert {"databases": databases, "users": sorted(users)} == expected
    else:
        raise AssertionError(f"unknown fact {fact!r} in tests/data/facts.json")


def test_the_tables_hold_enough_cases():
    assert len(BUILDERS) + len(FACTS) >= 40
    assert {c["builder"].partition(".")[2] for c in BUILDERS} >= {
        "mysql_create", "mysql_user", "redis_create_user", "nginx_config", "nginx_switch_script",
        "nginx_check_function", "env_file"}


def test_the_operations_of_facts_are_what_agents_answer():
    op = ServiceProcesses.operation("auto-shop-prod-web", group="auto-shop-prod")
    assert (op.service_list.name_prefix, op.service_list.group) == ("auto-shop-prod-web", "auto-shop-prod")
    assert NginxFile.command("/etc/nginx/conf.d/auto-shop prod.conf") == \
        "cat '/etc/nginx/conf.d/auto-shop prod.conf' 2>/dev/null || echo '<missing>'"


def test_a_process_list_that_is_not_json_lines_is_named_not_a_crash():
    from controller.environments.facts import Unreadable
    good = '{"name": "auto-a-b-web", "instance": "1", "alive": true}\n'
    with pytest.raises(Unreadable, match=r"^the process list is not readable at line 2: '\[deployer-agent: 9 bytes"):
        ServiceProcesses.parse(good + "[deployer-agent: 9 bytes of output lost here: disk full]\n")
