"""Who may talk to the controller: enrolment, mutual TLS, revocation, renewal, the one door.

Real controller and agent processes over real gRPC and TLS; raw clients play the intruders.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common import tls
from controller.fleet import door
from protos import deployer_pb2 as pb
from protos import deployer_pb2_grpc as pb_grpc
from tests.harness import PY, ROOT, Agent, Cluster, Controller, wait_for


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("trust"))
    c.controller.start()
    c.add_agent("computing-1")
    c.wait_connected("computing-1")
    yield c
    c.close()


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def enroll_raw(cluster: Cluster, agent_id: str, token: str) -> tuple[bytes, bytes]:
    """Enrol like an agent would, in-process: (key, certificate) PEM."""
    ca = (cluster.controller.store / "pki" / "ca.crt").read_bytes()
    key, csr = tls.new_key_and_csr(agent_id)
    with grpc.secure_channel(cluster.controller.enroll_address, grpc.ssl_channel_credentials(ca),
                             options=[("grpc.ssl_target_name_override", tls.SERVER_NAME)]) as channel:
        reply = pb_grpc.EnrollmentStub(channel).Enroll(
            pb.EnrollRequest(token=token, agent_id=agent_id, csr_pem=csr), timeout=10)
    return key, reply.certificate_pem


def connect_raw(cluster: Cluster, key: bytes | None, cert: bytes | None, agent_id: str = "intruder",
                roles=("computing",), **hello_fields) -> grpc.RpcError | pb.ControllerMessage:
    """Open Connect with these credentials and send a hello: the first reply or the error."""
    ca = (cluster.controller.store / "pki" / "ca.crt").read_bytes()
    credentials = grpc.ssl_channel_credentials(ca, key, cert)
    hello = pb.AgentMessage(hello=pb.Hello(agent_id=agent_id, roles=list(roles), version="test",
                                           heartbeat_interval_s=5, **hello_fields))
    with grpc.secure_channel(cluster.controller.address, credentials,
                             options=[("grpc.ssl_target_name_override", tls.SERVER_NAME)]) as channel:
        stream = pb_grpc.AgentGatewayStub(channel).Connect(iter([hello]), timeout=10)
        try:
            return next(stream)
        except grpc.RpcError as exc:
            return exc


def connected_events(cluster: Cluster, agent_id: str) -> int:
    return sum(1 for e in cluster.controller.events("agent.connected") if e["agent_id"] == agent_id)


def other_ca_certificate(agent_id: str) -> tuple[bytes, bytes]:
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deployer controller CA")])
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agent_id)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(tls.ROLE_URI + "computing")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM)


# ---------------------------------------------------------------- refusals

def test_an_agent_without_a_certificate_reaches_no_method(cluster):
    before = connected_events(cluster, "intruder")
    outcome = connect_raw(cluster, None, None)
    assert isinstance(outcome, grpc.RpcError)
    # gRPC in Python cannot ask for an optional client certificate, so the refusal happens in the
    # TLS handshake: no HTTP/2 stream exists, so no method can run.
    assert outcome.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(cluster.controller.address) as channel:
        with pytest.raises(grpc.RpcError) as plain:
            pb_grpc.AgentGatewayStub(channel).Renew(pb.RenewRequest(), timeout=5)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    assert connected_events(cluster, "intruder") == before


def test_a_certificate_from_another_ca_is_refused(cluster):
    key, cert = other_ca_certificate("computing-1")
    outcome = connect_raw(cluster, key, cert, agent_id="computing-1")
    assert isinstance(outcome, grpc.RpcError)
    assert outcome.code() == grpc.StatusCode.UNAVAILABLE
    # The genuine computing-1 kept its session: the impostor replaced nothing.
    assert cluster.agents_json()["computing-1"]["state"] == "connected"


def test_a_reused_expired_or_foreign_token_is_refused(cluster):
    token = cluster.controller.token(("computing",))
    enroll_raw(cluster, "reuse-1", token)
    with pytest.raises(grpc.RpcError) as reused:
        enroll_raw(cluster, "reuse-2", token)
    assert reused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in reused.value.details()

    bound = cluster.controller.token(("computing",), agent_id="web-7")
    with pytest.raises(grpc.RpcError) as foreign:
        enroll_raw(cluster, "web-8", bound)
    assert foreign.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "for agent web-7" in foreign.value.details()

    db = sqlite3.connect(cluster.controller.store / "deployer.db")
    expired = cluster.controller.token(("computing",))
    db.execute("UPDATE tokens SET expires = 0 WHERE id = ?", (tls.parse_token(expired).token_id,))
    db.commit()
    with pytest.raises(grpc.RpcError) as late:
        enroll_raw(cluster, "late-1", expired)
    assert late.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in late.value.details()

    forged = tls.Token(tls.parse_token(token).token_id, "not-the-secret", tls.parse_token(token).ca_fingerprint)
    with pytest.raises(grpc.RpcError) as wrong:
        enroll_raw(cluster, "forged-1", str(forged))
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Only a hash of a token's secret is stored.
    rows = db.execute("SELECT secret_sha256 FROM tokens").fetchall()
    assert all(tls.parse_token(token).secret not in r[0] for r in rows)


def test_an_open_token_cannot_take_an_enrolled_identity(cluster):
    """Else its holder would get computing-1's operations (and secrets) by posing as it."""
    with pytest.raises(grpc.RpcError) as taken:
        enroll_raw(cluster, "computing-1", cluster.controller.token(("computing",)))
    assert taken.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "computing-1 is already enrolled" in taken.value.details()
    assert cluster.agents_json()["computing-1"]["state"] == "connected"
    # A token made for an id replaces that agent's certificates (a reinstalled host).
    first_key, first_cert = enroll_raw(cluster, "rebuilt-1", cluster.controller.token(("daemons",)))
    key, cert = enroll_raw(cluster, "rebuilt-1", cluster.controller.token(("daemons",), agent_id="rebuilt-1"))
    old = connect_raw(cluster, first_key, first_cert, agent_id="rebuilt-1", roles=("daemons",))
    assert isinstance(old, grpc.RpcError) and old.code() == grpc.StatusCode.UNAUTHENTICATED
    new = connect_raw(cluster, key, cert, agent_id="rebuilt-1", roles=("daemons",))
    assert not isinstance(new, grpc.RpcError), new


def test_a_stream_waiting_to_say_hello_is_checked_again_after_a_revocation(cluster):
    key, cert = enroll_raw(cluster, "lurker-1", cluster.controller.token(("daemons",)))
    ca = (cluster.controller.store / "pki" / "ca.crt").read_bytes()
    go = threading.Event()

    def messages():
        go.wait(20)
        yield pb.AgentMessage(hello=pb.Hello(agent_id="lurker-1", roles=["daemons"], version="test",
                                             heartbeat_interval_s=5))

    with grpc.secure_channel(cluster.controller.address, grpc.ssl_channel_credentials(ca, key, cert),
                             options=[("grpc.ssl_target_name_override", tls.SERVER_NAME)]) as channel:
        stream = pb_grpc.AgentGatewayStub(channel).Connect(messages(), timeout=20)
        wait_for(lambda: channel_ready(channel), 10, what="the stream to open")
        wait_for(lambda: [e for e in cluster.controller.events("agent.stream_opened") if e["agent_id"] == "lurker-1"],
                 30, what="the call past the door, waiting for its hello")
        assert cluster.deployctl("agents", "revoke", "lurker-1").returncode == 0
        go.set()
        with pytest.raises(grpc.RpcError) as refused:
            next(stream)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert connected_events(cluster, "lurker-1") == 0


def channel_ready(channel: grpc.Channel) -> bool:
    try:
        grpc.channel_ready_future(channel).result(timeout=1)
        return True
    except grpc.FutureTimeoutError:
        return False


def test_a_certificate_claims_only_its_own_identity_and_roles(cluster):
    key, cert = enroll_raw(cluster, "honest-1", cluster.controller.token(("daemons",)))
    outcome = connect_raw(cluster, key, cert, agent_id="computing-1", roles=("daemons",))
    assert isinstance(outcome, grpc.RpcError) and outcome.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "belongs to agent honest-1" in outcome.details()
    outcome = connect_raw(cluster, key, cert, agent_id="honest-1", roles=("computing",))
    assert isinstance(outcome, grpc.RpcError) and outcome.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not enrolled for role computing" in outcome.details()
    welcome = connect_raw(cluster, key, cert, agent_id="honest-1", roles=("daemons",))
    assert not isinstance(welcome, grpc.RpcError), welcome
    assert welcome.WhichOneof("msg") == "welcome"


def test_revocation_cuts_an_agent_off_at_once(cluster, tmp_path):
    agent = cluster.add_agent("doomed-1")
    cluster.wait_connected("doomed-1")
    key, cert = tls.Credentials(agent.state_dir / "tls").load()[:2]
    result = cluster.deployctl("agents", "revoke", "doomed-1")
    assert result.returncode == 0, result.stderr
    assert b"its session was cut off" in result.stdout
    # The running agent is told UNAUTHENTICATED and stops for good (exit 3), it does not retry.
    assert agent.proc.wait(20) == 3
    assert b"revoked" in agent.log.read_bytes()
    listed = cluster.agents_json()["doomed-1"]
    assert listed["revoked"] is True and listed["state"] != "connected"

    before = connected_events(cluster, "doomed-1")
    outcome = connect_raw(cluster, key, cert, agent_id="doomed-1")
    assert isinstance(outcome, grpc.RpcError) and outcome.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in outcome.details()
    ca = (cluster.controller.store / "pki" / "ca.crt").read_bytes()
    refusals = len(cluster.controller.events("rpc.unauthenticated"))
    with grpc.secure_channel(cluster.controller.address, grpc.ssl_channel_credentials(ca, key, cert),
                             options=[("grpc.ssl_target_name_override", tls.SERVER_NAME)]) as channel:
        with pytest.raises(grpc.RpcError) as renew:
            pb_grpc.AgentGatewayStub(channel).Renew(pb.RenewRequest(csr_pem=tls.new_key_and_csr("doomed-1")[1]),
                                                    timeout=5)
    assert renew.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert connected_events(cluster, "doomed-1") == before  # the handler never ran
    wait_for(lambda: len(cluster.controller.events("rpc.unauthenticated")) > refusals, 10,
             what="the door logging this refusal")  # this call's, not an earlier one's

    unknown = cluster.deployctl("agents", "revoke", "nobody-9")
    assert unknown.returncode == 2 and b"unknown agent 'nobody-9'" in unknown.stderr


def test_an_agent_without_certificate_or_token_says_how_to_enrol(cluster, tmp_path):
    agent = Agent(tmp_path, "fresh-1", cluster.controller.address)
    agent.start()
    assert agent.proc.wait(20) == 2
    assert b"not enrolled" in agent.log.read_bytes()
    agent.token = "dpt1.garbage"
    agent.start()
    assert agent.proc.wait(20) == 2
    assert b"malformed enrolment token" in agent.log.read_bytes()


def test_enroll_command_pins_the_ca_and_refuses_another_controller(cluster, tmp_path):
    token = cluster.controller.token(("daemons",))
    state = tmp_path / "state"
    args = [PY, "-m", "agent.main", "enroll", "--id", "daemons-9", "--controller", cluster.controller.address,
            "--state-dir", str(state), "--token", token]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "enrolled as daemons-9 (roles: daemons)" in done.stdout
    assert (state / "tls" / "ca.crt").read_bytes() == (cluster.controller.store / "pki" / "ca.crt").read_bytes()
    assert oct((state / "tls" / "agent.key").stat().st_mode & 0o777) == "0o600"
    # A token naming another CA: the controller at this address is not the one that made it.
    other = tls.Token("abc", "def", "A" * 43)
    args[-1] = str(other)
    args[args.index("--state-dir") + 1] = str(tmp_path / "other")
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "does not present the CA named in the token" in done.stderr
    assert not (tmp_path / "other" / "tls").exists()


def test_token_create_on_the_command_line(cluster):
    made = cluster.deployctl("token", "create", "--role", "computing", "--ttl", "30m", "--json")
    assert made.returncode == 0, made.stderr
    reply = json.loads(made.stdout)
    assert reply["token"].startswith("dpt1.") and reply["expires_at"] > 0
    bad = cluster.deployctl("token", "create", "--role", "database")
    assert bad.returncode == 2 and b"not 'database'" in bad.stderr
    bad = cluster.deployctl("token", "create", "--role", "computing", "--ttl", "soon")
    assert bad.returncode == 2 and b"--ttl 'soon'" in bad.stderr
    # The token is never written to the controller's log.
    assert reply["token"].split(".")[2] not in cluster.controller.log.read_text()


def test_tokens_are_listed_without_secrets_and_revoked_before_use(cluster):
    made = [json.loads(cluster.deployctl("token", "create", "--role", "daemons", *extra, "--json").stdout)
            for extra in ((), ("--agent", "web-9"))]
    open_token, bound_token = (m["token"] for m in made)
    enroll_raw(cluster, "lister-1", cluster.controller.token(("computing",)))  # one used token besides

    listed = cluster.deployctl("token", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.decode().splitlines()[1:]}
    assert set(rows) >= {m["token_id"] for m in made}
    assert "web-9" in rows[made[1]["token_id"]] and "open" in rows[made[0]["token_id"]]
    assert all(m["token"].split(".")[2] not in listed.stdout.decode() for m in made)

    revoked = cluster.deployctl("token", "revoke", made[0]["token_id"])
    assert revoked.returncode == 0 and b"revoked" in revoked.stdout, revoked.stderr
    assert cluster.deployctl("token", "revoke", made[0]["token_id"]).returncode == 0  # twice is fine
    with pytest.raises(grpc.RpcError) as refused:
        enroll_raw(cluster, "late-9", open_token)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert f"enrolment token {made[0]['token_id']} was revoked" in refused.value.details()

    # Used, revoked and expired tokens are gone from the default list and shown with --all.
    default = json.loads(cluster.deployctl("token", "list", "--json").stdout)
    assert made[0]["token_id"] not in {t["id"] for t in default}
    every = {t["id"]: t for t in json.loads(cluster.deployctl("token", "list", "--all", "--json").stdout)}
    assert every[made[0]["token_id"]]["state"] == "revoked"
    assert every[made[1]["token_id"]]["state"] == "open" and every[made[1]["token_id"]]["agent_id"] == "web-9"
    assert {t["state"] for t in every.values()} >= {"used", "revoked", "open"}
    assert not any("secret" in key for t in every.values() for key in t)

    # A used token made an agent: it is that agent that is revoked, and the CLI says so.
    used = next(t for t in every.values() if t["used_by"] == "lister-1")
    refused = cluster.deployctl("token", "revoke", used["id"])
    assert refused.returncode == 1 and b"deployctl agents revoke lister-1" in refused.stderr
    unknown = cluster.deployctl("token", "revoke", "0123456789ab")
    assert unknown.returncode == 2 and unknown.stderr.strip().count(b"\n") == 0
    assert b"unknown enrolment token" in unknown.stderr
    assert bound_token.split(".")[2] not in cluster.controller.log.read_text()


def test_grants_come_with_the_token_and_change_without_enrolling_again(cluster):
    made = cluster.deployctl("token", "create", "--role", "daemons", "--provides", "redis,nginx",
                             "--address", "10.0.0.9", "--json")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)
    listed = {t["id"]: t for t in json.loads(cluster.deployctl("token", "list", "--json").stdout)}
    assert listed[token["token_id"]]["provides"] == ["nginx", "redis"]
    key, cert = enroll_raw(cluster, "granted-1", token["token"])
    welcome = connect_raw(cluster, key, cert, agent_id="granted-1", roles=("daemons",),
                          capabilities=["mysql", "nginx", "redis"],
                          settings={"mysql.port": "3306", "nginx.listen": "80", "address": "10.6.6.6"})
    assert not isinstance(welcome, grpc.RpcError), welcome
    agent = cluster.agents_json()["granted-1"]
    assert agent["granted"] == ["nginx", "redis"] and agent["capabilities"] == ["nginx", "redis"]
    assert agent["address"] == "10.0.0.9" and agent["address_granted"]       # granted, not its hello's
    table = cluster.deployctl("agents")
    row = next(line for line in table.stdout.decode().splitlines() if line.startswith("granted-1 "))
    assert "nginx,redis" in row and "10.0.0.9" in row
    assert b"granted-1 is configured to provide mysql, not granted" in table.stderr
    assert b"deployctl agents grant granted-1 --provides mysql" in table.stderr

    done = cluster.deployctl("agents", "grant", "granted-1", "--provides", "mysql")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == "granted-1 may provide: mysql, nginx, redis; address 10.0.0.9"
    done = cluster.deployctl("agents", "ungrant", "granted-1", "--provides", "nginx", "--address")
    assert done.returncode == 0, done.stderr
    assert b"may provide: mysql, redis; address 127.0.0.1 (the address its link comes from)" in done.stdout
    agent = cluster.agents_json()["granted-1"]
    assert agent["capabilities"] == ["mysql", "redis"] and not agent["address_granted"]

    for args, message in [
        (("agents", "grant", "granted-1", "--provides", "ftp"), b"unknown capability 'ftp'"),
        (("agents", "grant", "granted-1", "--address", "10.0.0.1; }"), b"expected an IP address or a host name"),
        (("agents", "grant", "nobody-7", "--provides", "mysql"), b"unknown agent 'nobody-7'"),
        (("agents", "grant", "granted-1"), b"say what to grant"),
        (("token", "create", "--role", "daemons", "--provides", "mysql,ftp"), b"unknown capability 'ftp'"),
        (("token", "create", "--role", "daemons", "--address", "a b"), b"--address 'a b'"),
    ]:
        refused = cluster.deployctl(*args)
        assert refused.returncode == 2 and message in refused.stderr, (args, refused.stderr)
        assert refused.stderr.strip().count(b"\n") == 0


# ---------------------------------------------------------------- renewal

def test_certificates_renew_before_they_expire(tmp_path):
    c = Cluster(tmp_path)
    # Renewed after two thirds of 30 s: long enough that a handshake on a busy machine fits in
    # what is left, short enough to see the whole cycle; every wait below is a generous deadline.
    c.controller.extra_args = ("--agent-cert-ttl", "30")
    c.controller.start()
    try:
        c.add_agent("short-1")
        c.wait_connected("short-1")
        first = c.agents_json()["short-1"]["certificate_expires"]
        wait_for(lambda: c.agents_json()["short-1"]["certificate_expires"] > first, 90, every=0.5,
                 what="a renewed certificate")
        # At the end of the certificate a link was opened with, the controller ends that link and
        # the agent dials again at once with its renewed certificate: no link outlives its own.
        wait_for(lambda: c.controller.events("agent.certificate_expired"), 90, every=0.5,
                 what="the first link ended at its certificate's expiry")
        assert __import__("time").time() >= first
        wait_for(lambda: len(c.controller.events("agent.connected")) >= 2, 90, every=0.5,
                 what="a new link with the renewed certificate")
        c.wait_connected("short-1")
        # Past the first certificate's end, a restarted agent still gets in with the renewed one.
        wait_for(lambda: __import__("time").time() > first + 1, 90, every=0.5, what="first expiry")
        c.agents["short-1"].stop()
        c.agents["short-1"].start()
        c.wait_connected("short-1")
        assert c.controller.events("agent.renewed")
        # Renewals happen once per two thirds of a lifetime, not in a loop, and retire old
        # certificates: at most the link's, the newest and the new one stay valid.
        db = sqlite3.connect(c.controller.store / "deployer.db")
        issued = db.execute("SELECT COUNT(*) FROM certificates WHERE agent_id = 'short-1'").fetchone()[0]
        valid = db.execute("SELECT COUNT(*) FROM certificates WHERE agent_id = 'short-1' AND revoked IS NULL")
        assert 2 <= issued <= 8 and valid.fetchone()[0] <= 3
    finally:
        c.close()


def test_an_agent_cannot_renew_in_a_loop(cluster):
    """Each renewal is a signature and a row: one right after the last is refused, and says when."""
    key, cert = enroll_raw(cluster, "eager-1", cluster.controller.token(("computing",)))
    ca = (cluster.controller.store / "pki" / "ca.crt").read_bytes()
    with grpc.secure_channel(cluster.controller.address, grpc.ssl_channel_credentials(ca, key, cert),
                             options=[("grpc.ssl_target_name_override", tls.SERVER_NAME)]) as channel:
        for _ in range(3):
            _, csr = tls.new_key_and_csr("eager-1")
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.AgentGatewayStub(channel).Renew(pb.RenewRequest(csr_pem=csr), timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert re.fullmatch(r"agent eager-1 got a certificate \d+ s ago; ask again in \d+ s",
                                refused.value.details())
    db = sqlite3.connect(cluster.controller.store / "deployer.db")
    assert db.execute("SELECT COUNT(*) FROM certificates WHERE agent_id = 'eager-1'").fetchone()[0] == 1


def _served_serial(port: int, ca_pem: bytes, client: tuple[Path, Path] | None = None) -> int:
    """The serial of the certificate a TLS port presents to a new connection (ALPN h2, like gRPC)."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.set_alpn_protocols(["h2"])
    if client:
        context.load_cert_chain(*client)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=tls.SERVER_NAME) as conn:
            return x509.load_der_x509_certificate(conn.getpeercert(binary_form=True)).serial_number


def test_a_running_controller_renews_its_own_certificate(tmp_path, monkeypatch):
    """Renewed on the first connection once it is due, without a restart, on the asyncio server
    the controller runs; both ports serve the new one. (That the agent port still refuses a
    client without a certificate is proved on a real controller by
    test_an_agent_without_a_certificate_reaches_no_method.)

    The controller's clock is set back when the first certificate is made, so that certificate
    is due now: no waiting for a short-lived one to age, and nothing to race on a busy machine.
    The TLS clients check validity against the real clock, which every certificate here meets."""
    from controller.fleet import pki
    from controller.daemon import server_credentials
    real_now = pki._now
    made_at = real_now() - pki.SERVER_LIFETIME + pki.SERVER_RENEW_BEFORE / 2   # half its renewal window left
    monkeypatch.setattr(pki, "_now", lambda: made_at)
    authority = pki.Authority(tmp_path / "pki")
    key_pem, csr = tls.new_key_and_csr("web-1")
    cert = authority.sign(csr, "web-1", ["computing"], 3600 * 24 * 400)
    (tmp_path / "a.key").write_bytes(key_pem)
    (tmp_path / "a.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    client = (tmp_path / "a.crt", tmp_path / "a.key")
    first = authority.server_cert.serial_number
    monkeypatch.setattr(pki, "_now", real_now)

    async def scenario():
        server = grpc.aio.server()
        agents = server.add_secure_port("127.0.0.1:0", server_credentials(authority, clients=True))
        enroll = server.add_secure_port("127.0.0.1:0", server_credentials(authority, clients=False))
        await server.start()
        serial = lambda *args: asyncio.to_thread(_served_serial, *args)  # noqa: E731
        try:
            served = await asyncio.gather(*(serial(agents, authority.ca_pem, client) for _ in range(4)),
                                          serial(enroll, authority.ca_pem))
            renewed = authority.server_cert.serial_number
            assert renewed != first and set(served) == {renewed}
            on_disk = x509.load_pem_x509_certificate((tmp_path / "pki" / "server.crt").read_bytes())
            assert on_disk.serial_number == renewed
            assert on_disk.not_valid_after_utc - real_now() > pki.SERVER_RENEW_BEFORE   # not due again
            again = await asyncio.gather(*(serial(agents, authority.ca_pem, client) for _ in range(2)))
            assert set(again) == {renewed}                                           # renewed once
        finally:
            await server.stop(0)
    asyncio.run(scenario())


def _public(key_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, None)
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_renewals_from_many_threads_leave_one_matching_pair(tmp_path, monkeypatch):
    """gRPC asks from its own threads, several handshakes at once: one renewal happens, and the
    key and certificate on disk and in memory belong together."""
    from controller.fleet import pki
    monkeypatch.setattr(pki, "SERVER_LIFETIME", datetime.timedelta(seconds=3600))
    monkeypatch.setattr(pki, "SERVER_RENEW_BEFORE", datetime.timedelta(seconds=7200))  # always due
    authority = pki.Authority(tmp_path / "pki")
    for round_ in range(1, 6):
        errors: list[BaseException] = []
        barrier = threading.Barrier(6)

        def renew():
            barrier.wait()
            try:
                authority.refresh_server()
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)
        threads = [threading.Thread(target=renew) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        generation, key_pem, chain = authority.server_identity()
        assert generation >= round_
        cert = x509.load_pem_x509_certificate(chain)
        assert _public(key_pem) == cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        on_disk = x509.load_pem_x509_certificate((tmp_path / "pki" / "server.crt").read_bytes())
        assert _public((tmp_path / "pki" / "server.key").read_bytes()) == on_disk.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert not list((tmp_path / "pki").glob(".*.tmp"))


def test_a_server_key_that_does_not_match_its_certificate_is_replaced(tmp_path):
    """A crash between writing the key and the certificate must not leave a controller that can
    serve no TLS at all."""
    from controller.fleet import pki
    first = pki.Authority(tmp_path / "pki")
    other, _ = tls.new_key_and_csr("x")
    (tmp_path / "pki" / "server.key").write_bytes(other)
    again = pki.Authority(tmp_path / "pki")
    assert again.server_cert.serial_number != first.server_cert.serial_number
    _, key_pem, chain = again.server_identity()
    assert _public(key_pem) == x509.load_pem_x509_certificate(chain).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# ---------------------------------------------------------------- the store and plain links

def test_the_controller_refuses_a_store_others_can_read(tmp_path):
    controller = Controller(tmp_path)
    controller.store.mkdir(mode=0o755)
    os.chmod(controller.store, 0o755)
    done = subprocess.run([PY, "-m", "controller.daemon", "--store", str(controller.store),
                           "--listen", controller.address], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert f"{controller.store} is open to other users (mode drwxr-xr-x)" in done.stderr


def test_half_a_ca_or_a_bad_lifetime_stops_the_controller(tmp_path):
    controller = Controller(tmp_path).start()
    controller.stop()
    (controller.store / "pki" / "ca.crt").unlink()
    done = subprocess.run([PY, "-m", "controller.daemon", "--store", str(controller.store),
                           "--listen", controller.address], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "ca.crt is missing while the rest of the CA is there" in done.stderr
    assert (controller.store / "pki" / "ca.key").exists()     # the old key was not replaced
    done = subprocess.run([PY, "-m", "controller.daemon", "--store", str(tmp_path / "other"),
                           "--listen", controller.address, "--agent-cert-ttl", "-5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--agent-cert-ttl -5" in done.stderr


def test_plain_links_only_on_loopback(tmp_path):
    done = subprocess.run([PY, "-m", "controller.daemon", "--store", str(tmp_path / "s"),
                           "--listen", "0.0.0.0:7799", "--insecure"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "only on loopback" in done.stderr
    done = subprocess.run([PY, "-m", "agent.main", "--id", "a-1", "--role", "computing", "--controller",
                           "10.1.2.3:7710", "--insecure", "--state-dir", str(tmp_path / "a")],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "only to a loopback controller" in done.stderr


def test_an_insecure_loopback_cluster_still_works(tmp_path):
    c = Cluster(tmp_path, insecure=True)
    c.controller.start()
    try:
        c.add_agent("plain-1")
        c.wait_connected("plain-1")
        done = c.deployctl("exec", "--agent", "plain-1", "--", "echo", "hello")
        assert done.returncode == 0 and b"hello" in done.stdout
    finally:
        c.close()


# ---------------------------------------------------------------- one door

def _registered_methods() -> set[str]:
    return {f"/{service.full_name}/{method.name}"
            for service in pb.DESCRIPTOR.services_by_name.values() for method in service.methods}


def test_every_registered_method_is_on_exactly_one_allowlist():
    methods = _registered_methods()
    listed = [m for allowed in door.ALLOWED.values() for m in allowed]
    missing = methods - set(listed)
    assert not missing, f"methods on no allowlist: {sorted(missing)}"
    assert not set(listed) - methods, "allowlisted methods that do not exist"
    assert len(listed) == len(set(listed)), "a method is open to two credential kinds"


def test_a_method_off_the_list_is_refused_before_its_handler(tmp_path):
    """An operator listener that (wrongly) also served the agent gateway would still refuse it."""
    ran = []
    refused = asyncio.run(_call_off_the_list(tmp_path, ran))
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not open to operator credentials" in refused.details()
    assert ran == []


async def _call_off_the_list(tmp_path, ran: list) -> grpc.aio.AioRpcError:

    class Gateway(pb_grpc.AgentGatewayServicer):
        async def Renew(self, request, context):
            ran.append("renew")
            return pb.Certificate()

    server = grpc.aio.server(interceptors=[door.Door(door.OPERATOR)])
    pb_grpc.add_AgentGatewayServicer_to_server(Gateway(), server)
    socket_path = tmp_path / "s.sock"
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.AgentGatewayStub(channel).Renew(pb.RenewRequest(), timeout=5)
    finally:
        await server.stop(0)
    return refused.value


def test_a_renewal_cut_short_by_a_crash_leaves_a_usable_pair(tmp_path):
    """The key is renamed into place but the process dies before the certificate is: the next
    start finishes the save instead of pairing the new key with the old certificate."""
    credentials = tls.Credentials(tmp_path / "tls")
    old_key, _ = tls.new_key_and_csr("a-1")
    credentials.save(old_key, b"old certificate", b"ca")
    new_key, _ = tls.new_key_and_csr("a-1")
    for path, data, mode in ((credentials.key_path, new_key, 0o600), (credentials.ca_path, b"ca", 0o644),
                             (credentials.cert_path, b"new certificate", 0o644)):
        tls.write_atomic(path.with_name(path.name + ".next"), data, mode)
    os.replace(credentials.key_path.with_name("agent.key.next"), credentials.key_path)   # then the crash
    key, cert, ca = credentials.load()
    assert (key, cert, ca) == (new_key, b"new certificate", b"ca")
    assert not list((tmp_path / "tls").glob("*.next"))
    assert oct(credentials.key_path.stat().st_mode & 0o777) == "0o600"
