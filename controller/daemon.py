"""deployer-controller: serve agents (gateway) and operators (Unix socket, and TCP with TLS and
operator tokens) from one store."""

from __future__ import annotations

import argparse
import asyncio
import errno
import fcntl
import os
import socket
import stat
import signal
import sys
import threading
import time
from pathlib import Path

import grpc
import structlog

from common.tls import is_loopback
from common.system import configure_logging, sd_notify, tune_malloc
from protos import deployer_pb2_grpc as pb_grpc

from common import __version__
from controller.fleet.access import OperatorTokens
from controller.state.db import Database
from controller.fleet.dispatcher import Dispatcher
from controller.fleet.door import AGENT, ENROLLEE, OPERATOR, Door
from controller.environments.healing import Healer
from controller.environments.notify import Notifier
from controller.environments.watch import Watcher
from controller import settings as settings_mod
from controller.state import retention
from controller.state.outbox import Outbox
from controller.state.events import EnvEvents
from controller.environments.orders import Environments
from controller.state.ledger import Ledger
from controller.fleet.gateway import AgentGateway, EnrollmentService
from controller.operator_service import OperatorService
from controller.environments.ownership import owner_id
from controller.fleet.pki import DEFAULT_AGENT_TTL_S, Authority, Enrolment, PkiError
from controller.state.vault import VaultError
from controller.fleet.registry import Registry
from common import errors

log = structlog.get_logger("controller")

# Must stay consistent with the agent's keepalive (agent/link.py): agents ping every 20 s, and we
# accept pings down to every 10 s so that an agent is never answered GOAWAY too_many_pings.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),  # what gRPC 1.85 really waits for a ping's answer
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_send_message_length", 8 << 20),
    # gRPC sets SO_REUSEPORT by default: a second controller could then bind the same port and
    # the kernel would share the agents' connections between the two. One owner per port.
    ("grpc.so_reuseport", 0),
]
# The enrolment port answers anyone: small messages, few streams at a time.
ENROLL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 10),
    ("grpc.max_send_message_length", 64 << 10),
    ("grpc.max_concurrent_streams", 16),
    ("grpc.so_reuseport", 0),
]
DEFAULT_LISTEN = "127.0.0.1:7710"
RETENTION_EVERY_S = 3600.0


def server_credentials(authority: Authority, clients: bool) -> grpc.ServerCredentials:
    """TLS for a port, with the server certificate looked at again before every handshake (gRPC
    asks on each new connection): a renewed one is served from the next connection on. `clients`:
    require an agent certificate from this CA."""

    def configuration() -> tuple[int, grpc.ServerCertificateConfiguration]:
        generation, key_pem, chain = authority.server_identity()
        return generation, grpc.ssl_server_certificate_configuration(
            [(key_pem, chain)], root_certificates=authority.ca_pem if clients else None)

    served, initial = configuration()
    lock = threading.Lock()  # gRPC calls `fetch` from its own threads, maybe several at once

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal served
        try:
            generation = authority.refresh_server()
        except Exception as exc:  # never break a handshake: the current certificate serves on
            log.error("pki.server_renewal_failed", error=f"{type(exc).__name__}: {exc}", retry_in_s=60)
            return None
        with lock:
            if generation == served:
                return None
            served, fresh = configuration()
        log.info("pki.server_certificate_renewed", not_after=authority.server_cert.not_valid_after_utc.isoformat())
        return fresh

    return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=clients)


def default_store() -> Path:
    return Path(os.environ.get("DEPLOYER_STORE") or Path.cwd() / "store")


class StartupError(errors.Broken):
    """The controller cannot start; the message says why in one line."""


def enroll_address(listen: str) -> str:
    """The enrolment port's default: the agent port's host, the next port number."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise StartupError(f"--listen {listen!r} must be HOST:PORT")
    return f"{host}:{int(port) + 1}"


def check_private(store: Path) -> None:
    """Refuse a store other users can read or enter: it holds the CA key and the ledger."""
    for path in (store, store / "pki", store / "pki" / "ca.key", store / "pki" / "server.key",
                 store / "deployer.db", store / "secrets.key"):
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue
        if mode & 0o077:
            raise StartupError(f"{path} is open to other users (mode {stat.filemode(mode)}): "
                               f"run `chmod go= {path}` (the store holds keys and secrets)")


def port_taken(address: str) -> str:
    """The first address HOST:PORT resolves to that something already listens on, or ''.

    gRPC binds every address a name resolves to and succeeds if one of them could be bound:
    `localhost:7710` would quietly serve on ::1 alone while another controller holds 127.0.0.1.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or int(port) == 0:
        return ""
    try:
        resolved = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return ""  # gRPC's own bind says it
    for family, kind, proto, _, sockaddr in resolved:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC does, so that connections in TIME_WAIT do not count; without SO_REUSEPORT,
            # so that any listener counts.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{port}"
    return ""


def claim_socket(path: Path) -> None:
    """Take the operator socket's path, removing a socket only if nobody serves it any more (a
    controller that was killed): another controller may use another store with the same --socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"--socket {path} exists and is not a socket: remove it or choose another path")
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            return
        except OSError as exc:
            raise StartupError(f"the operator socket {path} cannot be checked ({exc.strerror}): "
                               "is another controller serving it?") from None
    raise StartupError(f"the operator socket {path} is served by another process (another controller?)")


def _lock_store(store: Path) -> int:
    fd = os.open(store / "controller.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StartupError(f"another controller is running on {store}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class Controller:
    def __init__(self, store: Path, socket_path: Path, listen: str, operator_listen: str | None,
                 lost_after: float, insecure: bool = False, enroll_listen: str | None = None,
                 tls_names: list[str] = (), agent_cert_ttl: float = DEFAULT_AGENT_TTL_S,
                 settings: settings_mod.Settings = settings_mod.Settings()) -> None:
        self.settings = settings
        self.store = store
        self.socket_path = socket_path
        self.listen = listen
        self.operator_listen = operator_listen
        self.lost_after = lost_after
        self.insecure = insecure
        self.enroll_listen = enroll_listen
        self.tls_names = list(tls_names)
        self.agent_cert_ttl = agent_cert_ttl
        self.stopping = asyncio.Event()

    def _check_addresses(self) -> None:
        if self.insecure and not is_loopback(self.listen):
            raise StartupError(f"--insecure serves agents without TLS, so only on loopback; "
                               f"{self.listen} is not a loopback address")

    @staticmethod
    def _bind(server: grpc.aio.Server, address: str, credentials, what: str) -> None:
        if not address.startswith("unix:"):
            taken = port_taken(address)
            if taken:
                raise StartupError(f"cannot listen for {what} on {address}: {taken} is already taken "
                                   "(another controller?)")
        try:
            bound = (server.add_secure_port(address, credentials) if credentials
                     else server.add_insecure_port(address))
        except RuntimeError:
            raise StartupError(f"cannot listen for {what} on {address}: the address is taken or "
                               "not this host's") from None
        if not bound:
            raise StartupError(f"cannot listen for {what} on {address}")

    def _open_store(self) -> tuple[int, Database, Authority, Enrolment]:
        """Take the store: its lock, then its database and its certificate authority."""
        if self.store.exists():
            check_private(self.store)
        self.store.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = _lock_store(self.store)
        try:
            db = Database(self.store / "deployer.db")
        except VaultError as exc:
            raise StartupError(str(exc)) from None
        try:
            authority = Authority(self.store / "pki", self.tls_names)
            enrolment = Enrolment(db, authority, self.agent_cert_ttl)
        except PkiError as exc:
            raise StartupError(str(exc)) from None
        return lock, db, authority, enrolment

    def _agent_servers(self, registry: Registry, dispatcher: Dispatcher, enrolment: Enrolment,
                       authority: Authority) -> list[grpc.aio.Server]:
        """The servers agents dial, bound: with TLS the enrolment one, then the agents' own."""
        servers = []
        agents = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[
            Door(AGENT, enrolment.accepted, certificates=not self.insecure)])
        pb_grpc.add_AgentGatewayServicer_to_server(AgentGateway(registry, dispatcher, enrolment), agents)
        if self.insecure:
            self._bind(agents, self.listen, None, "agents")
        else:
            self._bind(agents, self.listen, server_credentials(authority, clients=True), "agents")
            enroll = grpc.aio.server(options=ENROLL_OPTIONS, interceptors=[Door(ENROLLEE)])
            pb_grpc.add_EnrollmentServicer_to_server(EnrollmentService(enrolment), enroll)
            self._bind(enroll, self.enroll_listen, server_credentials(authority, clients=False), "enrolment")
            servers.append(enroll)
        servers.append(agents)
        return servers

    async def _prune_every(self, db: Database, dispatcher: Dispatcher) -> None:
        """Job retention: at start, then every hour (the folders go off the event loop)."""
        while True:
            try:
                planned = retention.plan(self.store, db, self.settings.retention, dispatcher.followed)
                if planned.jobs or planned.operations:
                    done = await asyncio.to_thread(retention.remove, planned)
                    retention.record(db, done)
                    dispatcher.forget([op for _, ops in done.jobs for op in ops] + done.operations)
                    log.info("retention.pruned", jobs=len(done.jobs), operations=len(done.operations),
                             bytes=done.bytes)
            except Exception as exc:  # never take the controller down; said, and tried again later
                log.error("retention.failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(RETENTION_EVERY_S)

    async def _renew_every(self, environments: Environments) -> None:
        """`tls: auto`: certificates that are due are renewed, each as a job (certificates.py)."""
        if not self.settings.acme.directory:
            return
        while True:
            await asyncio.sleep(self.settings.acme.check_every)
            try:
                started = environments.renew_due()
                if started:
                    log.info("certificate.renewals", jobs=started)
            except Exception as exc:  # a round that failed: the next one tries again
                log.error("certificate.round_failed", error=f"{type(exc).__name__}: {exc}")

    async def run(self) -> None:
        self._check_addresses()
        self.enroll_listen = self.enroll_listen or enroll_address(self.listen)
        lock, db, authority, enrolment = self._open_store()
        registry = Registry(db, self.lost_after)
        ledger = Ledger(db, owner=owner_id(authority.fingerprint))
        dispatcher = Dispatcher(db, registry, self.store, ledger)
        notifier = Notifier(Outbox(db), self.settings.targets, self.settings.retry)
        environments = Environments(self.store, dispatcher, registry, ledger, notifier)
        environments.healer = Healer(environments, EnvEvents(db), replace_after=self.settings.health.replace_after)
        environments.acme = self.settings.acme
        watcher = Watcher(environments, environments.healer, self.settings.health)
        servers = self._agent_servers(registry, dispatcher, enrolment, authority)
        operator_tokens = OperatorTokens(db, authority.fingerprint)
        service = OperatorService(registry, dispatcher, environments, enrolment, operator_tokens)
        operators = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[Door(OPERATOR)])
        pb_grpc.add_OperatorServicer_to_server(service, operators)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        claim_socket(self.socket_path)
        self._bind(operators, f"unix:{self.socket_path}", None, "operators")
        servers.append(operators)
        if self.operator_listen:
            # A server of its own: a door admits one kind of credential, and here it is a token
            # on every call, over TLS with our server certificate (never plain, even on loopback:
            # the token would travel in clear to whoever listens on the host).
            remote = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[Door(OPERATOR, tokens=operator_tokens)])
            pb_grpc.add_OperatorServicer_to_server(service, remote)
            self._bind(remote, self.operator_listen, server_credentials(authority, clients=False), "operators")
            servers.append(remote)
        for server in servers:
            await server.start()
        os.chmod(self.socket_path, 0o600)
        sweeper = asyncio.create_task(registry.sweeper())
        notifier.start()
        pruner = asyncio.create_task(self._prune_every(db, dispatcher))
        renewer = asyncio.create_task(self._renew_every(environments))
        watching = asyncio.create_task(watcher.run())
        log.info("controller.started", version=__version__, store=str(self.store),
                 listen=self.listen, tls=not self.insecure,
                 enroll=None if self.insecure else self.enroll_listen,
                 socket=str(self.socket_path), operator_listen=self.operator_listen, pid=os.getpid())
        sd_notify("READY=1")
        sd_notify(f"STATUS=serving agents on {self.listen}")
        await self.stopping.wait()

        sd_notify("STOPPING=1")
        log.info("controller.stopping")
        registry.close_all("the controller is shutting down")
        await asyncio.sleep(0.2)  # let the goodbyes go out
        for server in reversed(servers):
            await server.stop(1.0 if server is operators else 2.0)
        sweeper.cancel()
        pruner.cancel()
        renewer.cancel()
        watching.cancel()
        notifier.stop()
        dispatcher.close()
        db.close()
        self.socket_path.unlink(missing_ok=True)
        os.close(lock)
        log.info("controller.stopped")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="deployer-controller",
        description="The deployer controller: agents dial in, operators use deployctl.",
        epilog="example: deployer-controller --store /var/lib/deployer/store --listen 0.0.0.0:7710",
    )
    parser.add_argument("--store", type=Path, help="data folder (default $DEPLOYER_STORE or ./store)")
    parser.add_argument("--socket", type=Path, help="operator socket (default STORE/control.sock)")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help=f"agent gateway address (default {DEFAULT_LISTEN})")
    parser.add_argument("--enroll-listen",
                        help="enrolment address (TLS, token-authenticated; default: the --listen host, next port)")
    parser.add_argument("--tls-name", action="append", default=[],
                        help="an extra DNS name for the controller's certificate (repeatable)")
    parser.add_argument("--agent-cert-ttl", type=float, default=DEFAULT_AGENT_TTL_S,
                        help="lifetime of agent certificates in seconds (default 30 days; agents renew "
                             "after two thirds)")
    parser.add_argument("--insecure", action="store_true",
                        help="serve agents without TLS (loopback addresses only; for local trials)")
    parser.add_argument("--operator-listen",
                        help="also serve operators on this TCP address (TLS; every call needs an operator "
                             "token: deployctl operator-token create)")
    parser.add_argument("--lost-after", type=float, default=60.0,
                        help="seconds without contact before a disconnected agent is lost (default 60)")
    parser.add_argument("--config", type=Path,
                        help="settings file: job retention, notification webhooks (e.g. /etc/deployer/controller.yml)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-file", type=Path, help="append JSON logs here instead of stderr")
    parser.add_argument("--version", action="version", version=f"deployer-controller {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tune_malloc()
    os.umask(0o077)  # everything the controller writes is private
    log_stream = open(args.log_file, "a", buffering=1) if args.log_file else None
    configure_logging(args.log_level, log_stream)
    store = (args.store or default_store()).resolve()
    try:
        settings = settings_mod.load(args.config)
    except settings_mod.ConfigError as exc:
        print(f"deployer-controller: {exc}", file=sys.stderr)
        return 2
    controller = Controller(store, (args.socket or store / "control.sock").resolve(), args.listen,
                            args.operator_listen, args.lost_after, insecure=args.insecure,
                            enroll_listen=args.enroll_listen, tls_names=args.tls_name,
                            agent_cert_ttl=args.agent_cert_ttl, settings=settings)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, controller.stopping.set)
        await controller.run()

    started = time.monotonic()
    try:
        asyncio.run(serve())
    except StartupError as exc:
        print(f"deployer-controller: {exc}", file=sys.stderr)
        return 2
    log.debug("controller.exit", uptime_s=round(time.monotonic() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
