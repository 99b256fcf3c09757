"""Attacks on a shared server, replayed for real: each test plays a hostile tenant, a rogue agent
or a local user, and asserts that the concrete harm did not happen (not merely that an error was
printed). Where it can be shown safely, a test also shows the attack works without its defence.

Sections are independent (each builds what it needs); see docs/decisions/013-threat-model.md.
"""

from __future__ import annotations


# ---------------------------------------------------------------- 1. ownership before destruction


# ---------------------------------------------------------------- 2. tenant code without root


# ---------------------------------------------------------------- 3. agents prove what they provide


# ---------------------------------------------------------------- 4. operators authenticate
#
# A local user of the controller host who is not root (or any tenant process there) reaches the
# TCP operator port. Without a credential it gets UNAUTHENTICATED; with a read token it can look
# but not change; only an operate token enrols agents or runs commands, until it is revoked. The
# attack without the defence (an unauthenticated caller reaching SubmitExec through a door with
# no token check) is shown in tests/test_operator_access.py, not by a flag that would turn the
# check off here.

import json
import os
import pwd
import secrets
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.harness import ROOT, Cluster, free_port

# The user cannot run the test's interpreter (it may live under /root, which only root may enter):
# it runs the system's Python of the same version with the same packages, read-only.
_OP_PYTHON = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
_OP_RAW_ATTACK = """
import json, os, socket, sys
import grpc
from protos import deployer_pb2 as pb, deployer_pb2_grpc as pb_grpc
address, ca_file, socket_path = sys.argv[1:4]
out = {"uid": os.getuid(), "euid": os.geteuid()}
def codes(channel):
    stub, found = pb_grpc.OperatorStub(channel), {}
    for name, call, request in (
            ("CreateToken", stub.CreateToken, pb.TokenRequest(roles=["computing"], ttl_s=600)),
            ("SubmitExec", stub.SubmitExec, pb.SubmitExecRequest(
                target=pb.Target(all=True), exec=pb.ExecSpec(argv=["id"])))):
        try:
            call(request, timeout=10)
            found[name] = "OK"
        except grpc.RpcError as exc:
            found[name] = exc.code().name
    return found
tls = grpc.ssl_channel_credentials(open(ca_file, "rb").read())
out["tls"] = codes(grpc.secure_channel(address, tls, options=[
    ("grpc.ssl_target_name_override", "deployer-controller")]))
out["plain"] = codes(grpc.insecure_channel(address))
try:
    socket.socket(socket.AF_UNIX).connect(socket_path)
    out["socket"] = "connected"
except OSError as exc:
    out["socket"] = type(exc).__name__
print(json.dumps(out))
"""


class _OpLocalUser:
    """A throwaway Unix user (not root, no groups) with a private home, running deployctl."""

    def __init__(self) -> None:
        self.name = f"dtest-op-{secrets.token_hex(4)}"
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                            "--shell", "/usr/sbin/nologin", self.name], check=True, capture_output=True)
        entry = pwd.getpwnam(self.name)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        self.home = Path(tempfile.mkdtemp(prefix="dtest-op-home-"))
        shutil.chown(self.home, self.uid, self.gid)

    def write_private(self, name: str, text: str) -> Path:
        path = self.home / name
        path.write_text(text)
        shutil.chown(path, self.uid, self.gid)
        path.chmod(0o600)
        return path

    def run(self, argv: list[str], **env: str) -> subprocess.CompletedProcess:
        path = ":".join([*site.getsitepackages(), str(ROOT)])
        return subprocess.run(
            [_OP_PYTHON, *argv], cwd=self.home, user=self.uid, group=self.gid, extra_groups=[],
            env={"PATH": "/usr/bin:/bin", "HOME": str(self.home), "PYTHONPATH": path,
                 "PYTHONDONTWRITEBYTECODE": "1", "NO_COLOR": "1", **env},
            capture_output=True, text=True, timeout=60)

    def deployctl(self, address: str, *args: str, **env: str) -> subprocess.CompletedProcess:
        return self.run(["-m", "controller.cli", "--controller", address, *args], **env)

    def remove(self) -> None:
        subprocess.run(["userdel", self.name], capture_output=True)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture(scope="module")
def op_setup(tmp_path_factory):
    """A controller serving operators on loopback TCP, one connected agent, a local user."""
    if os.geteuid() != 0:
        pytest.skip("creates a Unix user")
    if not Path(_OP_PYTHON).exists():
        pytest.skip(f"{_OP_PYTHON} is needed to run a process as another user")
    base = tmp_path_factory.mktemp("operators")
    cluster = Cluster(base)
    address = f"127.0.0.1:{free_port()}"
    cluster.controller.extra_args = ("--operator-listen", address)
    user = None
    try:
        cluster.controller.start()
        cluster.add_agent("op-web-1")
        cluster.wait_connected("op-web-1")
        user = _OpLocalUser()
        ca = Path(user.home / "ca.crt")
        ca.write_bytes((cluster.controller.store / "pki" / "ca.crt").read_bytes())  # public
        ca.chmod(0o644)
        yield cluster, user, address, str(ca)
    finally:
        if user is not None:
            user.remove()
        cluster.close()


def _op_harm(cluster) -> tuple[int, list[str]]:
    """(enrolment tokens ever made, operations ever sent): what an attacker would have added."""
    listed = cluster.deployctl("token", "list", "--all", "--json")
    assert listed.returncode == 0, listed.stderr
    folder = cluster.controller.store / "operations"
    return len(json.loads(listed.stdout)), sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _op_token(cluster, role: str) -> str:
    made = cluster.deployctl("operator-token", "create", "--role", role, "--label", f"test {role}")
    assert made.returncode == 0, made.stderr
    return made.stdout.decode().strip()


def _op_one_line(done, code: int, *words: str) -> None:
    assert done.returncode == code, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deployctl: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_a_local_user_without_credentials_cannot_enrol_or_run_commands(op_setup):
    cluster, user, address, ca = op_setup
    marker = cluster.base / "op-pwned-anonymous"
    before = _op_harm(cluster)

    raw = user.run(["-c", _OP_RAW_ATTACK, address, ca, str(cluster.controller.socket)])
    assert raw.returncode == 0, raw.stderr
    seen = json.loads(raw.stdout)
    assert seen["uid"] != 0 and seen["euid"] != 0
    assert seen["tls"] == {"CreateToken": "UNAUTHENTICATED", "SubmitExec": "UNAUTHENTICATED"}
    assert seen["plain"] == {"CreateToken": "UNAVAILABLE", "SubmitExec": "UNAVAILABLE"}   # TLS only
    assert seen["socket"] == "PermissionError"                        # the 0600 socket in a 0700 store

    for args in (("token", "create", "--role", "computing"),
                 ("exec", "--agent", "op-web-1", "--", "touch", str(marker))):
        _op_one_line(user.deployctl(address, *args), 2, "needs an operator token")
        _op_one_line(user.deployctl(address, *args, DEPLOYER_CA=ca), 4,
                     "the controller refused the credential (no operator token")
        forged = "dpo1.0123456789ab.guessed-secret.x"
        _op_one_line(user.deployctl(address, *args, DEPLOYER_CA=ca, DEPLOYER_OPERATOR_TOKEN=forged), 4,
                     "the controller refused the credential (unknown operator token")
    assert _op_harm(cluster) == before and not marker.exists()
    assert cluster.controller.events("rpc.unauthenticated")


def test_a_read_credential_looks_but_changes_nothing(op_setup):
    cluster, user, address, ca = op_setup
    token = _op_token(cluster, "read")
    marker = cluster.base / "op-pwned-reader"
    before = _op_harm(cluster)

    # The token alone is enough: deployctl pins the CA whose fingerprint it carries.
    agents = user.deployctl(address, "agents", "--json", DEPLOYER_OPERATOR_TOKEN=token)
    assert agents.returncode == 0, agents.stderr
    assert [a["id"] for a in json.loads(agents.stdout)] == ["op-web-1"]
    for args, method in ((("token", "create", "--role", "computing"), "CreateToken"),
                         (("exec", "--agent", "op-web-1", "--", "touch", str(marker)), "SubmitExec"),
                         (("operator-token", "create", "--role", "operate"), "CreateOperatorToken"),
                         (("agents", "revoke", "op-web-1"), "RevokeAgent")):
        _op_one_line(user.deployctl(address, *args, DEPLOYER_OPERATOR_TOKEN=token), 4,
                     "not permitted", f"{method} needs the operate role")
    assert _op_harm(cluster) == before and not marker.exists()
    assert cluster.agents_json()["op-web-1"]["state"] == "connected"


def test_an_operate_credential_works_until_it_is_revoked(op_setup):
    cluster, user, address, ca = op_setup
    token = _op_token(cluster, "operate")
    loose = user.write_private("loose-token", token)
    loose.chmod(0o644)
    _op_one_line(user.deployctl(address, "--token-file", str(loose), "agents"), 2, "open to other users")
    token_file = user.write_private("token", token)
    marker = cluster.base / "op-by-operator"
    tokens_before, _ = _op_harm(cluster)

    done = user.deployctl(address, "--token-file", str(token_file), "--ca-file", ca,
                          "exec", "--agent", "op-web-1", "--", "touch", str(marker))
    assert done.returncode == 0, done.stderr
    assert marker.exists()
    made = user.deployctl(address, "--token-file", str(token_file), "token", "create", "--role", "computing")
    assert made.returncode == 0 and made.stdout.startswith("dpt1."), made.stderr
    assert _op_harm(cluster)[0] == tokens_before + 1
    assert [e["method"] for e in cluster.controller.events("operator.call")][-2:] == ["SubmitExec", "CreateToken"]

    token_id = token.split(".")[1]
    assert cluster.deployctl("operator-token", "revoke", token_id).returncode == 0
    again = cluster.base / "op-after-revocation"
    _op_one_line(user.deployctl(address, "--token-file", str(token_file), "exec", "--agent", "op-web-1",
                                "--", "touch", str(again)), 4, f"operator token {token_id} was revoked")
    assert not again.exists()


# ---------------------------------------------------------------- 5. limits per environment


# ---------------------------------------------------------------- 6. shared Redis stays available


# ---------------------------------------------------------------- 7. acknowledged output is kept


# ---------------------------------------------------------------- 8. least knowledge


# ---------------------------------------------------------------- 9. one owner per port
