"""Checks of deploy/: the systemd units, the example config, the installers.

The units are checked with `systemd-analyze verify`, which works without
systemd being PID 1 (it parses the unit and loads its dependencies from the
unit search path). It does insist that ExecStart= names an existing
executable, so each unit is verified on a copy whose executables are
replaced by stub scripts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"

CONTROLLER_UNIT = "deployer-controller.service"
AGENT_UNIT = "deployer-agent.service"
UNITS = (CONTROLLER_UNIT, AGENT_UNIT)
INSTALLERS = ("install-agent.sh", "install-controller.sh")
SHELL_FILES = (*INSTALLERS, "install-lib.sh")
VENV_BIN = "/opt/deployer/.venv/bin"

# Output of `systemd-analyze verify` that means the unit has a problem even
# though the exit code is 0 (systemd ignores unknown or malformed settings
# with a warning).
PROBLEM = re.compile(
    r"unknown (key|section|lvalue)|ignoring|deprecated|obsolete|not executable"
    r"|failed to parse|invalid|bad setting|missing",
    re.IGNORECASE,
)

# Environment for systemd tools: plain output on stderr, and a log level
# that shows warnings even if the caller's environment sets a quieter one.
SYSTEMD_ENV = {
    **os.environ,
    "SYSTEMD_LOG_LEVEL": "info",
    "SYSTEMD_LOG_TARGET": "console",
    "SYSTEMD_LOG_COLOR": "0",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_PAGER": "",
}


# --- helpers ----------------------------------------------------------------


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        for candidate in ("/usr/bin/systemd-analyze", "/bin/systemd-analyze"):
            if os.access(candidate, os.X_OK):
                path = candidate
                break
    if path is None:
        pytest.fail(
            "systemd-analyze not found: it comes with Debian's `systemd` "
            "package, which the project's setup installs "
            "(apt-get install -y systemd). Run the setup, or install that "
            "package, and run the tests again.",
            pytrace=False,
        )
    return path


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as lists of (key, value), in file order.

    Keys may repeat (SystemCallFilter=, Environment=, ...), which is why this
    is not configparser.
    """
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a Key=value line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str | None:
    """The effective value of a single-valued setting (the last one wins)."""
    found = values(unit, section, key)
    return found[-1] if found else None


def load(name: str) -> dict[str, list[tuple[str, str]]]:
    return parse_unit((DEPLOY / name).read_text())


def exec_path(command: str) -> str:
    """The executable of an Exec*= command line, without its prefixes."""
    return command.lstrip("-@:+!").split()[0]


def with_stub_executables(name: str, tmp_path: Path) -> Path:
    """Copy unit NAME into tmp_path/units with each Exec*= executable
    replaced by an existing stub script of the same name."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    out = []
    for line in (DEPLOY / name).read_text().splitlines():
        m = re.match(r"^(Exec[A-Za-z]+=)(.*)$", line)
        if m and m.group(2).strip():
            original = exec_path(m.group(2))
            stub = bindir / Path(original).name
            stub.write_text("#!/bin/sh\nexit 0\n")
            stub.chmod(0o755)
            line = m.group(1) + m.group(2).replace(original, str(stub), 1)
        out.append(line)
    unitdir = tmp_path / "units"
    unitdir.mkdir(exist_ok=True)
    copy = unitdir / name
    copy.write_text("\n".join(out) + "\n")
    return copy


def verify(unit_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            systemd_analyze(),
            "verify",
            "--man=no",  # no Documentation=man: lookups
            "--generators=no",  # nothing from the host's generators
            "--recursive-errors=no",  # judge this unit, not the host's units
            str(unit_file),
        ],
        capture_output=True,
        text=True,
        env=SYSTEMD_ENV,
        timeout=120,
        check=False,
    )


def problems(result: subprocess.CompletedProcess[str], unit_file: Path) -> list[str]:
    """Output lines that are about the unit, or that report a problem."""
    lines = (result.stdout + result.stderr).splitlines()
    return [
        line
        for line in lines
        if line.strip() and (unit_file.name in line or PROBLEM.search(line))
    ]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DEPLOY / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


# --- systemd-analyze verify -------------------------------------------------


@pytest.mark.parametrize("name", UNITS)
def test_unit_passes_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    unit_file = with_stub_executables(name, tmp_path)
    result = verify(unit_file)
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, f"systemd-analyze verify {name} failed\n{output}"
    assert problems(result, unit_file) == [], f"systemd-analyze verify {name} warned\n{output}"


def test_verify_check_catches_unknown_keys(tmp_path: Path) -> None:
    """The check above would notice a misspelt setting (exit code 0, warning
    on stderr): guards against a systemd-analyze that stays silent here."""
    stub = tmp_path / "stub"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit_file = tmp_path / "probe.service"
    unit_file.write_text(
        f"[Unit]\nDescription=probe\n\n[Service]\nType=notify\nExecStart={stub}\n"
        "ProtectSystm=strict\n"
    )
    result = verify(unit_file)
    found = problems(result, unit_file)
    assert any("ProtectSystm" in line for line in found), (
        f"expected a warning about ProtectSystm\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


def test_controller_sandbox_exposure_stays_low(tmp_path: Path) -> None:
    """`systemd-analyze security` rates the controller's sandbox; it should
    stay in the "OK" band (1.4 when written) so hardening is not lost
    unnoticed."""
    unit_file = with_stub_executables(CONTROLLER_UNIT, tmp_path)
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", "--no-pager", str(unit_file)],
        capture_output=True,
        text=True,
        env=SYSTEMD_ENV,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert m, f"no exposure level in the output of systemd-analyze security:\n{output}"
    assert float(m.group(1)) <= 2.5, output


# --- what the units must say ------------------------------------------------


@pytest.mark.parametrize("name", UNITS)
def test_unit_lifecycle_settings(name: str) -> None:
    unit = load(name)
    assert value(unit, "Service", "Type") == "notify"
    assert value(unit, "Service", "NotifyAccess") == "main"
    assert value(unit, "Service", "KillMode") == "mixed"
    assert value(unit, "Service", "Restart") == "on-failure"
    assert value(unit, "Service", "RestartSec")
    assert value(unit, "Service", "TimeoutStopSec")
    assert "network-online.target" in " ".join(values(unit, "Unit", "After"))
    assert values(unit, "Install", "WantedBy") == ["multi-user.target"]


@pytest.mark.parametrize(
    ("name", "program"),
    [(CONTROLLER_UNIT, "deployer-controller"), (AGENT_UNIT, "deployer-agent")],
)
def test_unit_runs_program_from_default_venv(name: str, program: str) -> None:
    # install-*.sh rewrites exactly this prefix when --prefix is given.
    (command,) = values(load(name), "Service", "ExecStart")
    assert exec_path(command) == f"{VENV_BIN}/{program}"


def test_controller_paths_match_its_managed_directories() -> None:
    unit = load(CONTROLLER_UNIT)
    (command,) = values(unit, "Service", "ExecStart")
    args = command.split()
    store = args[args.index("--store") + 1]
    socket = args[args.index("--socket") + 1]
    state_dirs = " ".join(values(unit, "Service", "StateDirectory")).split()
    runtime_dirs = " ".join(values(unit, "Service", "RuntimeDirectory")).split()
    # The store (which must be 0700 and the controller's own) is created by
    # systemd and writable under ProtectSystem=strict.
    assert store.removeprefix("/var/lib/") in state_dirs
    assert value(unit, "Service", "StateDirectoryMode") == "0700"
    assert str(Path(socket).parent).removeprefix("/run/") in runtime_dirs
    assert value(unit, "Service", "RuntimeDirectoryMode") == "0700"
    assert value(unit, "Service", "User") == "deployer"
    assert value(unit, "Service", "UMask") == "0077"


def test_controller_is_hardened() -> None:
    unit = load(CONTROLLER_UNIT)
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
    }
    actual = {key: value(unit, "Service", key) for key in expected}
    assert actual == expected


def test_controller_env_file_only_sets_variables_the_unit_uses() -> None:
    unit = load(CONTROLLER_UNIT)
    assert values(unit, "Service", "EnvironmentFile") == ["-/etc/deployer/controller.env"]
    defaults = {v.split("=", 1)[0] for v in values(unit, "Service", "Environment")}
    (command,) = values(unit, "Service", "ExecStart")
    result = run_script("install-controller.sh", "--print-config", "--operator-listen", "127.0.0.1:7711")
    assert result.returncode == 0, result.stderr
    written = {
        line.split("=", 1)[0]
        for line in result.stdout.splitlines()
        if line and not line.startswith("#")
    }
    assert written, result.stdout
    for variable in written:
        assert variable in defaults, f"{variable} has no default in the unit"
        assert variable in command, f"{variable} is not used by ExecStart="
    assert 'DEPLOYER_CONTROLLER_OPTS="--operator-listen 127.0.0.1:7711"' in result.stdout


def test_agent_keeps_what_deployed_software_needs() -> None:
    """The agent's sandbox is inherited by everything it runs: settings that
    would break ordinary builds and services must stay off (see the unit's
    comments for why each)."""
    unit = load(AGENT_UNIT)
    assert value(unit, "Service", "User") in (None, "root")
    for key in (
        "NoNewPrivileges",
        "PrivateDevices",
        "ProtectClock",
        "PrivateTmp",
        "ProtectHome",
        "MemoryDenyWriteExecute",
        "RestrictNamespaces",
        "SystemCallFilter",
        "PrivateUsers",
    ):
        assert value(unit, "Service", key) in (None, "no", "false"), key
    # /etc must stay writable (nginx configuration).
    assert value(unit, "Service", "ProtectSystem") in (None, "no", "yes", "true")
    (command,) = values(unit, "Service", "ExecStart")
    assert command.split()[1:] == ["--config", "/etc/deployer/agent.yml"]
    assert values(unit, "Unit", "AssertPathExists") == ["/etc/deployer/agent.yml"]


# --- example config ---------------------------------------------------------


def test_agent_example_config() -> None:
    import yaml

    config = yaml.safe_load((DEPLOY / "agent.example.yml").read_text())
    assert set(config) == {
        "id",
        "controller",
        "roles",
        "state_dir",
        "services_root",
        "capabilities",
    }
    assert re.fullmatch(r".+:\d+", config["controller"])
    assert config["roles"] and set(config["roles"]) <= {"computing", "daemons"}
    assert config["state_dir"] == "/var/lib/deployer-agent"
    assert config["services_root"] == "/srv/services"
    assert isinstance(config["capabilities"], list)


# --- install scripts --------------------------------------------------------


@pytest.mark.parametrize("name", SHELL_FILES)
def test_script_syntax(name: str) -> None:
    result = subprocess.run(
        ["bash", "-n", str(DEPLOY / name)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", INSTALLERS)
def test_installer_help(name: str) -> None:
    assert os.access(DEPLOY / name, os.X_OK), f"{name} is not executable"
    result = run_script(name, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    assert "Example:" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize(
    "args",
    [
        ("--role", "bogus"),
        ("--controller", "no-port"),
        ("--controller", "host:99999"),
        ("--id", "bad id"),
        ("--prefix", "relative/path"),
        ("--id",),
        ("--frobnicate",),
    ],
)
def test_install_agent_rejects_bad_arguments(args: tuple[str, ...]) -> None:
    # Checked before anything is touched, and before the root check.
    result = run_script("install-agent.sh", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--help" in result.stderr


def test_install_agent_config_is_valid_yaml() -> None:
    import yaml

    result = run_script(
        "install-agent.sh",
        "--print-config",
        "--controller",
        "[2001:db8::10]:7710",
        "--id",
        "web-1",
        "--role",
        "daemons",
        "--role",
        "computing",
        "--role",
        "daemons",
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == {
        "id": "web-1",
        "controller": "[2001:db8::10]:7710",
        "roles": ["daemons", "computing"],
    }


def test_install_controller_rejects_privileged_port() -> None:
    result = run_script("install-controller.sh", "--listen", "0.0.0.0:443")
    assert result.returncode == 2
    assert "below 1024" in result.stderr


def test_a_health_probe_is_not_fooled_by_another_process_on_the_port():
    """The port a new instance was given can be taken by someone else before it listens (another
    controller's service, any program): that process answering 200 must not pass for the instance."""
    import asyncio
    import http.server
    import threading

    from agent import probe
    from protos import deployer_pb2 as pb
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Ok", (http.server.BaseHTTPRequestHandler,), {
        "do_GET": lambda self: (self.send_response(200), self.send_header("Content-Length", "0"), self.end_headers()),
        "log_message": lambda self, *a: None}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_port
        spec = pb.HttpProbeSpec(url=f"http://127.0.0.1:{port}/health", attempts=3, interval_s=0.01,
                                service_name="auto-a-b-web", service_instance="3-20001")
        import subprocess
        with subprocess.Popen(["sleep", "30"]) as other:          # "the instance": not the listener
            try:
                refused = asyncio.run(probe.probe("op-1", spec, lambda: other.pid))
            finally:
                other.kill()
        assert refused.exit_code == 1
        assert f"answered, but port {port} is held by another process (pid" in refused.error
        import os
        passed = asyncio.run(probe.probe("op-2", spec, lambda: os.getpid()))   # the listener's own tree
        assert passed.exit_code == 0, passed.error
        gone = asyncio.run(probe.probe("op-3", spec, lambda: 0))               # the instance does not run
        assert gone.exit_code == 1 and "the instance is not running" in gone.error
        plain = asyncio.run(probe.probe("op-4", pb.HttpProbeSpec(url=spec.url, attempts=1)))
        assert plain.exit_code == 0                                             # no instance named: as before
    finally:
        server.shutdown()
        server.server_close()


def _answering(statuses: dict[str, int]):
    """A real HTTP server answering each path with its status (and counting requests)."""
    import http.server
    import threading
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            self.send_response(statuses.get(self.path, 200))
            if statuses.get(self.path) in (301, 302):
                self.send_header("Location", "/login")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.mark.parametrize("path, statuses, ok, error, requests", [
    ("/", {"/": 302}, True, "", 1),                              # a redirect to a login page answers
    ("/gone", {"/gone": 404}, False, "answered 404, which is not a healthy answer (expected 2xx or 3xx)", 1),
    ("/busy", {"/busy": 503}, False, "status 503 within 0.3 s", None),   # 5xx: tried until the deadline
    ("/slow", {"/slow": 429}, False, "status 429 within 0.3 s", None),   # "not now": tried again
])
def test_a_health_probe_fails_at_once_only_on_answers_waiting_cannot_change(path, statuses, ok, error, requests):
    import asyncio

    from agent import probe
    from protos import deployer_pb2 as pb
    server, seen = _answering(statuses)
    try:
        spec = pb.HttpProbeSpec(url=f"http://127.0.0.1:{server.server_port}{path}", interval_s=0.05, deadline_s=0.3)
        result = asyncio.run(probe.probe("op-1", spec))
        assert (result.exit_code == 0) is ok, result.error
        assert error in result.error
        if requests is not None:
            assert len(seen) == requests
        else:
            assert len(seen) >= 3            # it kept trying
    finally:
        server.shutdown()
        server.server_close()


def test_a_health_probe_takes_the_statuses_it_is_given():
    import asyncio

    from agent import probe
    from protos import deployer_pb2 as pb
    server, _ = _answering({"/login": 302, "/health": 204})
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        only_200 = pb.HttpProbeSpec(url=base + "/health", expect_statuses=[200], interval_s=0.05, deadline_s=0.2)
        assert "status 204 within 0.2 s" in asyncio.run(probe.probe("op-1", only_200)).error
        either = pb.HttpProbeSpec(url=base + "/login", expect_statuses=[200, 302], attempts=1)
        assert asyncio.run(probe.probe("op-2", either)).exit_code == 0
    finally:
        server.shutdown()
        server.server_close()


def test_a_health_probe_stops_as_soon_as_the_instance_has_exited():
    import asyncio

    from agent import probe
    from protos import deployer_pb2 as pb
    # Nothing listens, and the instance is gone: the probe says so instead of waiting out an hour
    # (were it to wait, the test's own time limit would end it).
    spec = pb.HttpProbeSpec(url="http://127.0.0.1:9/health", interval_s=0.05, deadline_s=3600)
    result = asyncio.run(probe.probe("op-1", spec, lambda: 0))
    assert result.exit_code == 1 and "the instance exited before it answered" in result.error
