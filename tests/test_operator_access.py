"""Operator credentials without a controller process: the role table, the token store, the door
on an operator listener, and how deployctl reads a token."""

from __future__ import annotations

import asyncio
import os
import sqlite3

import grpc
import pytest

from controller.fleet import access, door
from deployctl import channel as operator_channel
from controller.fleet.access import Role
from deployctl.cli import build_parser
from controller.state.db import Database
from protos import deployer_pb2 as pb
from protos import deployer_pb2_grpc as pb_grpc


def _operator_methods() -> set[str]:
    return {m.name for m in pb.DESCRIPTOR.services_by_name["Operator"].methods}


def test_every_operator_method_is_on_exactly_one_role_list():
    methods = _operator_methods()
    assert not methods - access.METHODS, f"operator methods with no role: {sorted(methods - access.METHODS)}"
    assert not access.METHODS - methods, "roles given to methods that do not exist"
    assert not access.NEEDS_READ & access.NEEDS_OPERATE, "a method on both role lists"
    assert door.ALLOWED[door.OPERATOR] == {f"/deployer.v1.Operator/{m}" for m in methods}


@pytest.mark.parametrize("role, method, permitted", [
    (Role.READ, "ListAgents", True),
    (Role.READ, "Ledger", True),
    (Role.READ, "ListOperatorTokens", True),
    (Role.READ, "SubmitExec", False),
    (Role.READ, "CreateToken", False),
    (Role.READ, "CreateOperatorToken", False),
    (Role.READ, "Plan", False),          # the controller would run git on sources the caller names
    (Role.READ, "Check", False),         # also repair, clean and destroy
    (Role.OPERATE, "SubmitExec", True),
    (Role.OPERATE, "ListAgents", True),
    (Role.OPERATE, "RevokeOperatorToken", True),
    (Role.OPERATE, "Renew", False),      # not an operator method at all
])
def test_roles_cover_methods(role, method, permitted):
    principal = access.Principal("abc", role)
    if permitted:
        access.authorize(principal, method)
    else:
        with pytest.raises(access.NotPermitted):
            access.authorize(principal, method)


@pytest.fixture
def store(tmp_path):
    db = Database(tmp_path / "deployer.db")
    clock = [1_000_000.0]
    yield access.OperatorTokens(db, "FINGERPRINT", clock=lambda: clock[0]), clock, db
    db.close()


def test_a_token_authenticates_as_its_role_and_only_its_hash_is_kept(store, tmp_path):
    tokens, _, db = store
    token, expires = tokens.create(Role.READ, 3600, "ci", access.SOCKET)
    assert str(token).startswith(f"dpo1.{token.token_id}.") and str(token).endswith(".FINGERPRINT")
    principal = tokens.authenticate(str(token))
    assert (principal.token_id, principal.role, principal.label, principal.expires) == \
        (token.token_id, Role.READ, "ci", expires)
    db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert token.secret.encode() not in (tmp_path / "deployer.db").read_bytes()
    listed = tokens.listed()
    assert [t["id"] for t in listed] == [token.token_id] and token.secret not in repr(listed)
    assert listed[0]["created_by"] == "socket"


def test_forged_revoked_expired_and_malformed_tokens_are_refused(store):
    tokens, clock, _ = store
    token, _ = tokens.create(Role.OPERATE, 60, "", access.SOCKET)
    forged = access.OperatorToken(token.token_id, "x" * 43, token.ca_fingerprint)
    unknown = access.OperatorToken("0123456789ab", token.secret, token.ca_fingerprint)
    for text, why in ((str(forged), "unknown operator token"), (str(unknown), "unknown operator token"),
                      ("dpt1.abc.def.ghi", "malformed operator token"), ("", "malformed operator token")):
        with pytest.raises(access.CredentialRefused, match=why):
            tokens.authenticate(text)
    clock[0] += 61
    with pytest.raises(access.CredentialRefused, match="has expired"):
        tokens.authenticate(str(token))
    assert tokens.listed() == [] and tokens.listed(every=True)[0]["state"] == "expired"
    fresh, _ = tokens.create(Role.OPERATE, 60, "", access.SOCKET)
    assert tokens.revoke(fresh.token_id) == [fresh.token_id]
    with pytest.raises(access.CredentialRefused, match="was revoked"):
        tokens.authenticate(str(fresh))
    assert tokens.revoke(fresh.token_id) == []          # twice is not an error
    with pytest.raises(LookupError):
        tokens.revoke("ffffffffffff")


def test_a_token_made_with_a_token_dies_with_it(store):
    """A stolen operate token cannot leave a longer-lived spare behind."""
    tokens, _, _ = store
    parent, parent_expires = tokens.create(Role.OPERATE, 3600, "laptop", access.SOCKET)
    by = tokens.authenticate(str(parent))
    child, child_expires = tokens.create(Role.OPERATE, access.MAX_TTL_S, "spare", by)
    grandchild, _ = tokens.create(Role.READ, 60, "", tokens.authenticate(str(child)))
    other, _ = tokens.create(Role.READ, 60, "", access.SOCKET)
    assert child_expires == parent_expires
    assert sorted(tokens.revoke(parent.token_id)) == sorted([parent.token_id, child.token_id, grandchild.token_id])
    for t in (parent, child, grandchild):
        with pytest.raises(access.CredentialRefused, match="revoked"):
            tokens.authenticate(str(t))
    assert tokens.authenticate(str(other)).role is Role.READ


def test_token_limits(store):
    tokens, _, _ = store
    reader = access.Principal("abc", Role.READ, expires=None)
    with pytest.raises(access.NotPermitted):
        tokens.create(Role.OPERATE, 60, "", reader)
    for ttl in (0, -1, access.MAX_TTL_S + 1):
        with pytest.raises(ValueError, match="--ttl"):
            tokens.create(Role.READ, ttl, "", access.SOCKET)
    for label in ("x" * 65, "tab\there", "new\nline"):
        with pytest.raises(ValueError, match="--label"):
            tokens.create(Role.READ, 60, label, access.SOCKET)


@pytest.mark.parametrize("header, token", [
    ("Bearer dpo1.a.b.c", "dpo1.a.b.c"), ("bearer  dpo1.a.b.c ", "dpo1.a.b.c"),
    (None, None), ("", None), ("Basic dXNlcg==", None), ("Bearer ", None),
])
def test_bearer_header(header, token):
    if token is None:
        with pytest.raises(access.CredentialRefused):
            access.bearer(header)
    else:
        assert access.bearer(header) == token


# ---------------------------------------------------------------- the door on an operator listener

class Recorder(pb_grpc.OperatorServicer):
    def __init__(self) -> None:
        self.ran: list[tuple[str, str]] = []

    async def SubmitExec(self, request, context):
        self.ran.append(("SubmitExec", door.OPERATOR_CALLER.get().token_id))
        return pb.SubmitReply()

    async def ListAgents(self, request, context):
        self.ran.append(("ListAgents", door.OPERATOR_CALLER.get().token_id))
        return pb.ListAgentsReply()


async def _calls(tmp_path, tokens: access.OperatorTokens | None, metadata) -> tuple[list, list]:
    """(status codes of SubmitExec and ListAgents, what ran) through a door on a real server."""
    recorder = Recorder()
    server = grpc.aio.server(interceptors=[door.Door(door.OPERATOR, tokens=tokens)])
    pb_grpc.add_OperatorServicer_to_server(recorder, server)
    path = tmp_path / "door.sock"
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    codes = []
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            stub = pb_grpc.OperatorStub(channel)
            for call, request in ((stub.SubmitExec, pb.SubmitExecRequest()), (stub.ListAgents, pb.ListAgentsRequest())):
                try:
                    await call(request, metadata=metadata, timeout=5)
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
    finally:
        await server.stop(0)
    return codes, recorder.ran


def test_without_the_token_check_anyone_who_reaches_the_listener_runs_commands(tmp_path):
    """What --operator-listen was: a door with no token store lets an unauthenticated caller
    reach SubmitExec (this is the Unix socket's door, whose 0600 mode is the credential)."""
    codes, ran = asyncio.run(_calls(tmp_path, None, None))
    assert codes == [grpc.StatusCode.OK, grpc.StatusCode.OK]
    assert ran == [("SubmitExec", ""), ("ListAgents", "")]


def test_the_door_checks_the_token_and_its_role_before_any_handler(tmp_path, store):
    tokens, _, _ = store
    reader, _ = tokens.create(Role.READ, 60, "", access.SOCKET)
    operator, _ = tokens.create(Role.OPERATE, 60, "", access.SOCKET)
    U, P, OK = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OK
    for metadata, codes, ran in (
            (None, [U, U], []),
            ((("authorization", "Bearer dpo1.0123456789ab.nope.x"),), [U, U], []),
            ((("authorization", f"Bearer {reader}"),), [P, OK], [("ListAgents", reader.token_id)]),
            ((("authorization", f"Bearer {operator}"),), [OK, OK],
             [("SubmitExec", operator.token_id), ("ListAgents", operator.token_id)])):
        assert asyncio.run(_calls(tmp_path, tokens, metadata)) == (codes, ran), metadata


class Streamer(pb_grpc.OperatorServicer):
    async def Follow(self, request, context):
        for n in range(40):
            yield pb.FollowEvent(output=pb.OutputChunk(op_id="op", offset=n, data=b"x"))
            await asyncio.sleep(0.1)


async def _follow_and_revoke(tmp_path, tokens: access.OperatorTokens, token: access.OperatorToken):
    server = grpc.aio.server(interceptors=[door.Door(door.OPERATOR, tokens=tokens)])
    pb_grpc.add_OperatorServicer_to_server(Streamer(), server)
    path = tmp_path / "stream.sock"
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    received = 0
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            call = pb_grpc.OperatorStub(channel).Follow(
                pb.FollowRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async for _ in call:
                    received += 1
                    if received == 3:
                        tokens.revoke(token.token_id)
    finally:
        await server.stop(0)
    return ended.value, received


def test_a_stream_ends_soon_after_its_token_is_revoked(tmp_path):
    db = Database(tmp_path / "deployer.db")
    try:
        tokens = access.OperatorTokens(db, "FINGERPRINT")
        token, _ = tokens.create(Role.READ, 60, "", access.SOCKET)
        ended, received = asyncio.run(_follow_and_revoke(tmp_path, tokens, token))
    finally:
        db.close()
    assert ended.code() == grpc.StatusCode.UNAUTHENTICATED and "was revoked" in ended.details()
    assert received <= 3 + door.RECHECK_S / 0.1 + 2   # not the 40 the stream had to give


# ---------------------------------------------------------------- how deployctl reads a token

def test_deployctl_reads_the_token_from_a_private_file_or_the_environment(tmp_path):
    path = tmp_path / "token"
    path.write_text("dpo1.abc.def.ghi\n")
    os.chmod(path, 0o644)
    with pytest.raises(operator_channel.ChannelError, match=r"open to other users .*chmod 600"):
        operator_channel.read_token(str(path), {})
    os.chmod(path, 0o600)
    assert operator_channel.read_token(str(path), {"DEPLOYER_OPERATOR_TOKEN": "other"}) == "dpo1.abc.def.ghi"
    assert operator_channel.read_token(None, {"DEPLOYER_OPERATOR_TOKEN": " dpo1.x.y.z\n"}) == "dpo1.x.y.z"
    assert operator_channel.read_token(None, {}) == ""
    with pytest.raises(operator_channel.ChannelError, match="cannot read"):
        operator_channel.read_token(str(tmp_path / "missing"), {})


def test_deployctl_takes_no_token_on_its_command_line():
    """Every user of the host can read a process's arguments."""
    options = {o for action in build_parser()._actions for o in action.option_strings}
    assert not {o for o in options if "token" in o} - {"--token-file"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--token", "dpo1.a.b.c", "agents"])


def test_the_migration_makes_the_table(tmp_path):
    Database(tmp_path / "deployer.db").close()
    conn = sqlite3.connect(tmp_path / "deployer.db")
    columns = [r[1] for r in conn.execute("PRAGMA table_info(operator_tokens)")]
    assert columns == ["id", "secret_sha256", "role", "label", "created", "expires", "revoked", "created_by"]
