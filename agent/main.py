"""deployer-agent: dial the controller, keep the link up, run what it sends."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time

import grpc
import structlog

from protos import deployer_pb2 as pb
from protos import deployer_pb2_grpc as pb_grpc

from agent import config as config_mod, link
from common import __version__
from common import tls
from common.system import configure_logging, sd_notify, tune_malloc
from agent.journal import Journal
from agent.operations import Operations
from agent.services import Supervisor
from agent.systemd_driver import SystemdDriver, booted
from agent.session import Session, SessionEnded

log = structlog.get_logger("agent")


def choose_driver(config: config_mod.AgentConfig):
    """systemd supervises services where it is PID 1; the built-in supervisor elsewhere."""
    wanted = config.service_driver
    if wanted == "systemd" or (wanted == "auto" and booted()):
        driver = SystemdDriver(config.state_dir)
        if removed := driver.retire_old_units():
            log.info("agent.old_units_removed", units=removed)
        return driver
    return Supervisor(config.state_dir)


class Agent:
    def __init__(self, config: config_mod.AgentConfig) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        config.services_root.mkdir(parents=True, exist_ok=True)
        self.ops = Operations(Journal(config.state_dir), config.services_root, choose_driver(config),
                              config.write_roots)
        self.credentials = tls.Credentials(config.tls_folder)
        self.stopping = asyncio.Event()
        self.ready_sent = False

    def _channel(self) -> grpc.aio.Channel:
        """A channel with the certificate on disk now (a renewed one is used from the next link on)."""
        if self.config.insecure:
            return grpc.aio.insecure_channel(self.config.controller, options=link.CHANNEL_OPTIONS)
        key, cert, ca = self.credentials.load()
        credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        return grpc.aio.secure_channel(self.config.controller, credentials,
                                       options=[*link.CHANNEL_OPTIONS,
                                                ("grpc.ssl_target_name_override", tls.SERVER_NAME)])

    async def _renew(self, channel: grpc.aio.Channel) -> None:
        """Ask for a fresh certificate once two thirds of the current one's life have passed."""
        while True:
            ident = self.credentials.identity()
            await asyncio.sleep(max(1.0, tls.renew_at(ident) - time.time()))  # never a tight loop
            key_pem, csr_pem = tls.new_key_and_csr(self.config.id)
            try:
                reply = await pb_grpc.AgentGatewayStub(channel).Renew(pb.RenewRequest(csr_pem=csr_pem), timeout=30)
            except grpc.aio.AioRpcError as exc:
                log.warning("agent.renew_failed", code=exc.code().name, details=exc.details())
                await asyncio.sleep(min(60.0, max(1.0, (ident.not_after - time.time()) / 10)))
                continue
            self.credentials.save(key_pem, reply.certificate_pem, self.credentials.load()[2])
            log.info("agent.renewed", not_after=reply.not_after)

    def _on_welcome(self) -> None:
        if not self.ready_sent:
            sd_notify("READY=1")
            self.ready_sent = True
        sd_notify(f"STATUS=connected to {self.config.controller}")

    async def run(self) -> None:
        self.ops.recover()
        attempts = 0
        self.session: Session | None = None
        driver = self.ops.driver
        watcher = None
        if hasattr(driver, "watch"):  # each driver says at once when a service ends unasked
            driver.on_exit = self._service_exited
            watcher = asyncio.create_task(driver.watch())
        try:
            await self._run(attempts)
        finally:
            if watcher:
                watcher.cancel()

    def _service_exited(self, exited) -> None:
        """Told on the link at once if there is one; otherwise the next hello's check finds it."""
        log.info("service.ended_unasked", service=f"{exited.name}@{exited.instance}", code=exited.exit_code,
                 signal=exited.signal)
        session = self.session
        if session is not None and session.welcomed:
            session.tell(pb.AgentMessage(exited=exited))

    async def _run(self, attempts: int) -> None:
        while not self.stopping.is_set():
            channel = self._channel()
            session = self.session = Session(self.config, self.ops, channel)
            task = asyncio.create_task(session.run(self._on_welcome))
            stop = asyncio.create_task(self.stopping.wait())
            renewer = None if self.config.insecure else asyncio.create_task(self._renew(channel))
            await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
            quick = False
            if not task.done():
                task.cancel()
            try:
                await task
            except SessionEnded as exc:
                log.info("agent.goodbye", reason=str(exc))
                quick = True
            except grpc.aio.AioRpcError as exc:
                if link.is_fatal(exc.code()):
                    await channel.close()
                    raise link.FatalLinkError(f"{exc.code().name}: {exc.details()}") from None
                log.warning("agent.disconnected", code=exc.code().name, details=exc.details())
            except (ConnectionError, asyncio.CancelledError) as exc:
                if not self.stopping.is_set():
                    log.warning("agent.disconnected", error=str(exc) or type(exc).__name__)
            finally:
                stop.cancel()
                if renewer:
                    renewer.cancel()
                await channel.close()
            if self.stopping.is_set():
                break
            if session.welcomed:
                attempts = 0
            delay = link.backoff_delay(0 if quick else attempts)
            log.info("agent.reconnecting", delay_s=round(delay, 3))
            attempts += 1
            sd_notify(f"STATUS=reconnecting in {delay:.1f}s")
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
            except asyncio.TimeoutError:
                pass
        await self.ops.stop_all("the agent is stopping", wait_s=5.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="deployer-agent",
        description="Dial the deployer controller and run the operations it sends.",
        epilog="example: deployer-agent --id web-1 --role computing --controller 10.0.0.5:7710 "
               "--state-dir /var/lib/deployer-agent",
    )
    parser.add_argument("--config", help="YAML file with the settings below (flags win)")
    parser.add_argument("--id", help="this agent's id, unique in the fleet")
    parser.add_argument("--controller", help="controller address, HOST:PORT or unix:PATH")
    parser.add_argument("--role", action="append", help="computing, daemons or routing (repeatable)")
    parser.add_argument("--capability", action="append", help="an extra capability label (repeatable)")
    parser.add_argument("--provide", action="append",
                        help="what this agent provides to deploys, e.g. mysql.port=3306, "
                             "nginx.conf_dir=/etc/nginx/conf.d (repeatable)")
    parser.add_argument("--state-dir", dest="state_dir", help="journal and spool (default /var/lib/deployer-agent)")
    parser.add_argument("--services-root", dest="services_root", help="default /srv/services")
    parser.add_argument("--write-root", dest="write_root", action="append",
                        help="a folder write_file may write under (repeatable; default: the services root "
                             "and the nginx.conf_dir this agent provides)")
    parser.add_argument("--heartbeat-interval", dest="heartbeat_interval", type=float)
    parser.add_argument("--service-driver", dest="service_driver", choices=["auto", "systemd", "supervisor"],
                        help="how service processes are run (default auto: systemd where it is PID 1)")
    parser.add_argument("--tls-dir", dest="tls_dir", help="the agent's key and certificates (default STATE_DIR/tls)")
    parser.add_argument("--enroll-address", dest="enroll_address",
                        help="the controller's enrolment port (default: the controller's host, next port)")
    parser.add_argument("--token", help="enrol with this token first if not enrolled yet "
                                        "(or $DEPLOYER_TOKEN; from `deployctl token create`)")
    parser.add_argument("--insecure", action="store_true",
                        help="plain link without certificates (only to a loopback controller)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--version", action="version", version=f"deployer-agent {__version__}")
    return parser.parse_args(argv)


def enroll(config: config_mod.AgentConfig, token_text: str) -> tls.Identity:
    """Redeem a token: pin the CA named in it, send a CSR, keep the key and the certificate."""
    token = tls.parse_token(token_text)
    host, port = tls.split_address(config.enrolment_address)
    ca_pem = tls.fetch_ca(host, port, token.ca_fingerprint)
    key_pem, csr_pem = tls.new_key_and_csr(config.id)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    with grpc.secure_channel(f"{host}:{port}", credentials,
                             options=[("grpc.ssl_target_name_override", tls.SERVER_NAME)]) as channel:
        try:
            reply = pb_grpc.EnrollmentStub(channel).Enroll(
                pb.EnrollRequest(token=token_text.strip(), agent_id=config.id, csr_pem=csr_pem), timeout=30)
        except grpc.RpcError as exc:
            raise tls.TlsError(f"enrolment refused by {host}:{port}: {exc.details() or exc.code().name}") from None
    if tls.fingerprint(reply.ca_pem) != token.ca_fingerprint:
        raise tls.TlsError("the controller answered with a CA other than the one in the token")
    tls.Credentials(config.tls_folder).save(key_pem, reply.certificate_pem, ca_pem)
    return tls.identity_of(reply.certificate_pem)


def _ready(config: config_mod.AgentConfig, token: str) -> str:
    """Enrol if a token is given and no certificate exists yet; why the agent cannot run, or ''."""
    if config.insecure:
        return ""
    credentials = tls.Credentials(config.tls_folder)
    if not credentials.exists():
        if not token:
            return (f"not enrolled (no certificate in {config.tls_folder}): run `DEPLOYER_TOKEN=TOKEN "
                    "deployer-agent enroll` with a token from `deployctl token create`")
        ident = enroll(config, token)
        log.info("agent.enrolled", agent_id=ident.agent_id, roles=list(ident.roles), not_after=ident.not_after)
        return ""
    ident = credentials.identity()
    if ident.agent_id != config.id:
        return f"the certificate in {config.tls_folder} is for agent {ident.agent_id}, not {config.id}"
    if ident.not_after < time.time():
        return (f"the certificate in {config.tls_folder} expired; enrol again with a new token "
                f"(remove the folder first)")
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    enrolling = bool(argv) and argv[0] == "enroll"
    args = parse_args(argv[1:] if enrolling else argv)
    tune_malloc()
    configure_logging(args.log_level)
    token = args.token or os.environ.get("DEPLOYER_TOKEN", "")
    try:
        config = config_mod.load(args, need_roles=not enrolling)
        if enrolling:
            if not token:
                raise tls.TlsError("enroll needs a token: DEPLOYER_TOKEN=TOKEN (or --token TOKEN)")
            ident = enroll(config, token)
            print(f"enrolled as {ident.agent_id} (roles: {', '.join(ident.roles)}); certificate valid "
                  f"until {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(ident.not_after))}; "
                  f"CA pinned in {config.tls_folder}")
            return 0
        problem = _ready(config, token)
    except (config_mod.ConfigError, tls.TlsError) as exc:
        print(f"deployer-agent: {exc}", file=sys.stderr)
        return 2
    if problem:
        print(f"deployer-agent: {problem}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(config))


async def _serve(config: config_mod.AgentConfig) -> int:
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stopping.set)
    log.info("agent.started", agent_id=config.id, roles=list(config.roles), version=__version__,
             controller=config.controller, pid=os.getpid())
    started = time.monotonic()
    try:
        await agent.run()
    except link.FatalLinkError as exc:
        log.error("agent.refused", error=str(exc))
        print(f"deployer-agent: the controller refused this agent: {exc}", file=sys.stderr)
        return 3
    sd_notify("STOPPING=1")
    log.info("agent.stopped", uptime_s=round(time.monotonic() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
