"""Limits per environment, the pure parts: the spec's `limits`, the cgroup layout, paths and values
for v1 and v2, the launcher that joins the group before the command executes, reading use and
out-of-memory kills, the systemd slice, the MariaDB connection limit and the status table.
Real processes in real cgroups are in tests/test_attacks.py (section 5)."""

from __future__ import annotations

import os

import pytest

from agent import limits
from agent.systemd_driver import parse_slice_use, scope_argv, slice_unit, template_unit
from controller.environments import commands as ops
from deployctl import render
from controller.environments.spec import Limits, SpecError, parse_spec
from protos import deployer_pb2 as pb
from tests.test_deploy_units import problems, verify

SPEC = """app: shop
environment: prod
domain: shop.localhost
{limits}services:
  web:
    path: /
    source: /srv/git/shop.git
    ref: main
    start: node server.js
"""


def spec_with(limits_text: str):
    return parse_spec(SPEC.format(limits=limits_text), "shop.yml")


# ---------------------------------------------------------------- the spec

def test_no_limits_in_the_spec_means_the_safe_defaults():
    spec = spec_with("")
    assert spec.limits == Limits(memory=512 << 20, cpu=1.0, processes=512, mysql_connections=30)
    assert "limits" not in spec.to_dict()  # canonical form: defaults left out


@pytest.mark.parametrize("text, expected", [
    ("limits: {memory: 64M, cpu: 0.5, processes: 64, mysql_connections: 5}\n",
     Limits(memory=64 << 20, cpu=0.5, processes=64, mysql_connections=5)),
    ("limits: {memory: 2G}\n", Limits(memory=2 << 30)),
    ("limits: {memory: 512MiB}\n", Limits()),
    ("limits: {memory: 1.5g}\n", Limits(memory=1536 << 20)),
    ("limits: {memory: 67108864}\n", Limits(memory=64 << 20)),
    ("limits: {cpu: 2}\n", Limits(cpu=2.0)),
    ("limits:\n", Limits()),
])
def test_limits_are_read_and_round_trip(text, expected):
    spec = spec_with(text)
    assert spec.limits == expected
    again = parse_spec(SPEC.format(limits=_yaml_limits(spec.to_dict())), "x")
    assert again.limits == expected


def _yaml_limits(data: dict) -> str:
    import yaml
    return yaml.safe_dump({"limits": data["limits"]}) if "limits" in data else ""


@pytest.mark.parametrize("text, message", [
    ("limits: {memory: lots}\n", "shop.yml:4: limits.memory: 'lots' is not a size; write bytes or a number "
                                 "with K, M, G or T (powers of 1024), like 512M or 2G"),
    ("limits: {memory: 1M}\n", "shop.yml:4: limits.memory: 1M is out of range: between 16M and 1T"),
    ("limits: {memory: true}\n", "shop.yml:4: limits.memory: 'true' is not a size"),
    ("limits: {cpu: 0}\n", "shop.yml:4: limits.cpu: must be a number of CPUs between 0.01 and 1024"),
    ("limits: {cpu: '1'}\n", "shop.yml:4: limits.cpu: must be a number of CPUs"),
    ("limits: {processes: 4}\n", "shop.yml:4: limits.processes: must be a whole number of processes between 8"),
    ("limits: {processes: 1.5}\n", "shop.yml:4: limits.processes: must be a whole number"),
    ("limits: {mysql_connections: 0}\n", "shop.yml:4: limits.mysql_connections: must be a whole number of "
                                         "connections between 1 and 100000, not '0'"),
    ("limits: {memroy: 1G}\n", "shop.yml:4: limits.memroy: unknown key 'memroy' (did you mean 'memory'?)"),
    ("limits: [1G]\n", "shop.yml:4: limits: must be a mapping, not a list"),
])
def test_bad_limits_name_the_file_line_and_key(text, message):
    with pytest.raises(SpecError) as err:
        spec_with(text)
    assert str(err.value).startswith(message), str(err.value)


# ---------------------------------------------------------------- the cgroup layout

V1_MOUNTS = """tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
V1_COMOUNTED = """cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0
"""
V2_MOUNTS = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n"


def test_v1_wins_on_a_hybrid_host():
    layout = limits.parse_mounts(V1_MOUNTS, v2_controllers="")
    assert layout is not None and layout.version == 1
    assert layout.points() == {"cpu": "/sys/fs/cgroup/cpu", "cpuacct": "/sys/fs/cgroup/cpuacct",
                               "memory": "/sys/fs/cgroup/memory", "pids": "/sys/fs/cgroup/pids"}


def test_v2_when_it_offers_the_controllers():
    layout = limits.parse_mounts(V2_MOUNTS, v2_controllers="cpuset cpu io memory hugetlb pids rdma misc")
    assert layout == limits.Layout(2, (("", "/sys/fs/cgroup"),))
    assert limits.parse_mounts(V2_MOUNTS, v2_controllers="cpu io") is None  # no memory, no pids: refused


def test_group_paths_are_under_our_parent():
    v1 = limits.parse_mounts(V1_MOUNTS)
    assert limits.group_dirs(v1, "auto-shop-prod", "op-20261201T101010-3f9a1c2e")["memory"] == \
        "/sys/fs/cgroup/memory/deployer/auto-shop-prod/op-20261201T101010-3f9a1c2e"
    v2 = limits.parse_mounts(V2_MOUNTS, "memory cpu pids")
    assert limits.group_dirs(v2, "auto-shop-prod") == {"": "/sys/fs/cgroup/deployer/auto-shop-prod"}
    co = limits.parse_mounts(V1_COMOUNTED)
    leaf = limits.Leaf(co, "auto-shop-prod", "auto-shop-prod-web@3-20001")
    assert leaf.procs_files() == [  # cpu and cpuacct share a folder: joined once
        "/sys/fs/cgroup/cpu,cpuacct/deployer/auto-shop-prod/auto-shop-prod-web@3-20001/cgroup.procs",
        "/sys/fs/cgroup/memory/deployer/auto-shop-prod/auto-shop-prod-web@3-20001/cgroup.procs",
        "/sys/fs/cgroup/pids/deployer/auto-shop-prod/auto-shop-prod-web@3-20001/cgroup.procs"]


@pytest.mark.parametrize("group, leaf", [
    ("shop-prod", ""), ("auto-../../x", ""), ("auto-Shop", ""), ("auto-", ""), ("auto-a/b", ""),
    ("auto-shop-prod", "../x"), ("auto-shop-prod", ".hidden"), ("auto-shop-prod", "a/b"),
    ("auto-shop-prod", "x" * 200), ("auto-shop-prod\n", ""),
])
def test_names_from_the_controller_are_checked_before_any_path(group, leaf):
    with pytest.raises(limits.LimitError):
        limits.group_dirs(limits.parse_mounts(V1_MOUNTS), group, leaf)


LIMITS = pb.Limits(group="auto-shop-prod", memory_bytes=64 << 20, cpu=0.5, processes=64)


def test_v1_values():
    assert limits.limit_values(limits.parse_mounts(V1_MOUNTS), LIMITS) == [
        ("memory", "memory.limit_in_bytes", "67108864"),
        ("memory", "memory.memsw.limit_in_bytes", "67108864"),
        ("cpu", "cpu.cfs_period_us", "100000"),
        ("cpu", "cpu.cfs_quota_us", "50000"),
        ("cpu", "cpu.shares", "512"),
        ("pids", "pids.max", "64"),
    ]


def test_v2_values():
    assert limits.limit_values(limits.parse_mounts(V2_MOUNTS, "memory cpu pids"), LIMITS) == [
        ("", "memory.max", "67108864"),
        ("", "memory.swap.max", "0"),
        ("", "cpu.max", "50000 100000"),
        ("", "cpu.weight", "50"),
        ("", "pids.max", "64"),
    ]


def test_no_limit_is_written_as_the_kernel_spells_it():
    unlimited = pb.Limits(group="auto-shop-prod")
    assert [v for _, _, v in limits.limit_values(limits.parse_mounts(V1_MOUNTS), unlimited)] == \
        ["-1", "-1", "100000", "-1", "1024", "max"]
    assert [v for _, _, v in limits.limit_values(limits.parse_mounts(V2_MOUNTS, "memory cpu pids"), unlimited)] == \
        ["max", "max", "max 100000", "100", "max"]


# ---------------------------------------------------------------- the launcher

def test_the_launcher_joins_the_group_before_it_executes_the_user_switch():
    argv = ["/usr/bin/setpriv", "--reuid=999", "--", "sh", "-c", "npm ci"]
    files = ["/sys/fs/cgroup/memory/deployer/auto-shop-prod/op-1/cgroup.procs",
             "/sys/fs/cgroup/pids/deployer/auto-shop-prod/op-1/cgroup.procs"]
    out = limits.launcher(files, argv)
    assert out[:2] == ["/bin/sh", "-c"] and out[3:] == ["deployer-limits", *argv]
    assert out[2] == ("echo 0 > /sys/fs/cgroup/memory/deployer/auto-shop-prod/op-1/cgroup.procs && "
                      "echo 0 > /sys/fs/cgroup/pids/deployer/auto-shop-prod/op-1/cgroup.procs && exec \"$@\"")


def test_the_launcher_mounts_the_private_tmp_in_a_namespace_of_its_own():
    out = limits.launcher(["/g/cgroup.procs"], ["true"], "/srv/.tmp/auto-shop-prod")
    assert out[2] == ("echo 0 > /g/cgroup.procs && exec unshare --mount --propagation private -- /bin/sh -c "
                      "'mount --bind \"$0\" /tmp && mount --bind \"$0\" /var/tmp && exec \"$@\"' "
                      "/srv/.tmp/auto-shop-prod \"$@\"")
    assert limits.launcher([], ["true"], "/tmp/x/.tmp/auto-shop-prod", over=())[2] == 'exec "$@"'


def test_the_launcher_runs_for_real(tmp_path):
    import subprocess
    marker = tmp_path / "joined"
    out = limits.launcher([str(marker)], ["sh", "-c", "echo ran \"$1\"", "x", "a b"])
    done = subprocess.run(out, capture_output=True, text=True, check=True)
    assert done.stdout == "ran a b\n" and marker.read_text() == "0\n"


# ---------------------------------------------------------------- use and kills

def test_out_of_memory_kills_are_read_from_either_version():
    assert limits.oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n") == 2              # v1
    assert limits.oom_kills("low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\noom_group_kill 0\n") == 1  # v2
    assert limits.oom_kills("") == 0
    assert limits.oom_message(64 << 20) == "killed by the kernel: out of memory (limit 64 MiB)"
    assert limits.oom_message(2 << 30) == "killed by the kernel: out of memory (limit 2 GiB)"


def test_v1_use():
    v1 = limits.parse_mounts(V1_MOUNTS)
    files = {("memory", "memory.usage_in_bytes"): "1048576\n", ("memory", "memory.max_usage_in_bytes"): "2097152\n",
             ("memory", "memory.limit_in_bytes"): "67108864\n", ("memory", "memory.failcnt"): "3\n",
             ("cpu", "cpu.cfs_quota_us"): "50000\n", ("cpu", "cpu.cfs_period_us"): "100000\n",
             ("cpuacct", "cpuacct.usage"): "1500000000\n",
             ("pids", "pids.current"): "5\n", ("pids", "pids.max"): "64\n", ("pids", "pids.peak"): "9\n"}
    assert limits.parse_usage(v1, files) == {
        "memory_bytes": 1 << 20, "memory_peak_bytes": 2 << 20, "memory_max_bytes": 64 << 20,
        "memory_limit_hits": 3, "cpu_max": 0.5, "cpu_s": 1.5, "processes": 5, "processes_peak": 9,
        "processes_max": 64}
    unlimited = {("memory", "memory.limit_in_bytes"): "9223372036854771712\n", ("pids", "pids.max"): "max\n",
                 ("cpu", "cpu.cfs_quota_us"): "-1\n", ("cpu", "cpu.cfs_period_us"): "100000\n"}
    assert limits.parse_usage(v1, unlimited) == {"memory_max_bytes": 0, "cpu_max": 0, "processes_max": 0}


def test_v2_use():
    v2 = limits.parse_mounts(V2_MOUNTS, "memory cpu pids")
    files = {("", "memory.current"): "1048576\n", ("", "memory.peak"): "2097152\n", ("", "memory.max"): "max\n",
             ("", "memory.events"): "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n", ("", "cpu.max"): "200000 100000\n",
             ("", "cpu.stat"): "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n",
             ("", "pids.current"): "3\n", ("", "pids.max"): "512\n"}
    assert limits.parse_usage(v2, files) == {
        "memory_bytes": 1 << 20, "memory_peak_bytes": 2 << 20, "memory_max_bytes": 0, "oom_kills": 1,
        "cpu_max": 2.0, "cpu_s": 2.5, "processes": 3, "processes_max": 512}


# ---------------------------------------------------------------- where systemd is PID 1

def test_slice_unit_verifies(tmp_path):
    path = tmp_path / "auto-shop-prod.slice"
    path.write_text(slice_unit(LIMITS))
    assert path.read_text().splitlines()[3:] == ["[Slice]", "MemoryMax=67108864", "MemorySwapMax=0", "CPUQuota=50%",
                                                 "CPUWeight=50", "TasksMax=64"]
    result = verify(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert problems(result, path) == []


def test_a_limited_template_is_in_the_slice_and_hardened(tmp_path):
    env_dir = tmp_path / "services"
    env_dir.mkdir()
    template = tmp_path / "auto-shop-prod-web@.service"
    template.write_text(template_unit(env_dir, "auto-shop-prod", "auto-shop-prod.slice"))
    text = template.read_text()
    for line in ("Slice=auto-shop-prod.slice", "PrivateTmp=yes", "NoNewPrivileges=yes", "ProtectSystem=full",
                 "ProtectHome=yes"):
        assert f"\n{line}\n" in text
    (tmp_path / "auto-shop-prod.slice").write_text(slice_unit(LIMITS))
    (env_dir / "auto-shop-prod-web@3-20001.env").write_text('DEPLOYER_CWD="/tmp"\nDEPLOYER_COMMAND="true"\n')
    instance = tmp_path / "auto-shop-prod-web@3-20001.service"
    instance.symlink_to(template)
    result = verify(instance)
    assert result.returncode == 0, result.stdout + result.stderr
    assert problems(result, instance) == []


def test_commands_go_in_a_scope_of_the_slice():
    assert scope_argv(LIMITS, "auto-shop-prod-op-1", ["setpriv", "--", "npm", "ci"]) == [
        "systemd-run", "--scope", "--quiet", "--collect", "--slice=auto-shop-prod.slice",
        "--unit=auto-shop-prod-op-1", "--", "setpriv", "--", "npm", "ci"]


def test_slice_use_from_systemctl_show():
    props = {"MemoryCurrent": "1048576", "MemoryPeak": "[not set]", "MemoryMax": "67108864",
             "CPUUsageNSec": "2500000000", "CPUQuotaPerSecUSec": "500ms", "TasksCurrent": "4", "TasksMax": "64"}
    assert parse_slice_use(props) == {"memory_bytes": 1 << 20, "memory_max_bytes": 64 << 20, "cpu_max": 0.5,
                                      "cpu_s": 2.5, "processes": 4, "processes_max": 64}
    assert parse_slice_use({"MemoryMax": "infinity", "TasksMax": "18446744073709551615",
                            "CPUQuotaPerSecUSec": "infinity"}) == {"memory_max_bytes": 0, "cpu_max": 0,
                                                                  "processes_max": 0}


# ---------------------------------------------------------------- the controller's builders and status

def test_environment_users_of_mariadb_get_a_connection_limit():
    assert b"IDENTIFIED BY 'pw' WITH MAX_USER_CONNECTIONS 30;\n" in ops.mysql_create("db", "u", "pw", 30)
    assert b"IF NOT EXISTS 'u'@'%' IDENTIFIED BY 'pw' WITH MAX_USER_CONNECTIONS 5;\n" in ops.mysql_user("db", "u", "pw", 5)
    assert b"MAX_USER_CONNECTIONS" not in ops.mysql_create("db", "u", "pw")
    assert ops.mysql_limit("it's", 30) == b"ALTER USER IF EXISTS 'it''s'@'%' WITH MAX_USER_CONNECTIONS 30;\n"


def test_the_limits_sent_with_tenant_operations():
    assert ops.limits(64 << 20, 0.5, 64, "auto-shop-prod", "/srv/deployer/") == pb.Limits(
        group="auto-shop-prod", memory_bytes=64 << 20, cpu=0.5, processes=64,
        tmp_dir="/srv/deployer/.tmp/auto-shop-prod")


def test_status_shows_each_hosts_use_against_its_limits():
    spec_limits = {"memory_bytes": 512 << 20, "cpu": 1.0, "processes": 512, "mysql_connections": 30}
    rows = [
        {"service": "web", "host": "computing-1", "limits": spec_limits,
         "use": {"memory_bytes": 40 << 20, "memory_peak_bytes": 60 << 20, "memory_max_bytes": 512 << 20,
                 "cpu_max": 1.0, "cpu_s": 3.2, "processes": 5, "processes_max": 512}},
        {"service": "api", "host": "computing-1", "limits": spec_limits, "use": {}},
        {"service": "worker", "host": "daemons-1", "limits": spec_limits},
    ]
    assert render.limits_table(rows).splitlines() == [
        "HOST         MEMORY                 PEAK      CPU                PROCESSES  MYSQL CONNECTIONS",
        "computing-1  40.0 MiB of 512.0 MiB  60.0 MiB  3.20s (max 1 CPU)  5 of 512   30",
        "daemons-1    - of 512.0 MiB         -         - (max 1 CPU)      - of 512   30",
    ]
    assert render.limits_table([{"service": "web", "host": ""}]) == ""


def test_changed_limits_restart_the_environment_under_the_new_ones():
    from controller.state.ledger import LiveInstance, ServiceState
    from controller.environments.planner import plan
    from controller.environments.spec import Service, Spec, code_fingerprint
    web = Service("web", path="/", source="/repo", ref="main", start="node server.js", health="/")
    commit = "1" * 40
    deployed = {"web": ServiceState("web", code=LiveInstance(1, commit, code_fingerprint(web)))}
    spec = Spec(1, "shop", "prod", "shop.test", (web,))
    assert code_fingerprint(web, Limits()) == code_fingerprint(web)   # as before limits existed
    assert plan(spec, deployed, {"web": commit}).empty
    tighter = plan(Spec(1, "shop", "prod", "shop.test", (web,), Limits(memory=256 << 20)), deployed, {"web": commit})
    assert [(s.service, s.change("code").new) for s in tighter.services] == [("web", True)]


@pytest.mark.skipif(os.geteuid() != 0 or limits.detect() is None, reason="needs root and cgroups")
def test_destroy_removes_the_environments_groups_and_tmp_with_its_user(tmp_path):
    import glob
    import secrets
    import subprocess
    user = f"auto-lim-{secrets.token_hex(3)}"
    subprocess.run(["sh", "-c", ops.ensure_unix_user(user)], check=True)
    try:
        limits.prepare(pb.Limits(group=user, memory_bytes=64 << 20, processes=64), "op-t-1")
        (tmp_path / ".tmp" / user).mkdir(parents=True)
        done = subprocess.run(["sh", "-c", ops.remove_unix_user(user, str(tmp_path))], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert glob.glob(f"/sys/fs/cgroup/**/deployer/{user}", recursive=True) == []
        assert not (tmp_path / ".tmp" / user).exists()
    finally:
        from tests.deploy_harness import remove_limits_group
        remove_limits_group(user)
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", user], capture_output=True)
