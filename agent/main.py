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

from . import __version__, config as config_mod, link
from .system import configure_logging, sd_notify, tune_malloc
from .journal import Journal
from .operations import Operations
from .services import Supervisor
from .systemd_driver import SystemdDriver, booted
from .session import Session, SessionEnded

log = structlog.get_logger("agent")


def choose_driver(config: config_mod.AgentConfig):
    """systemd supervises services where it is PID 1; the built-in supervisor elsewhere."""
    wanted = config.service_driver
    if wanted == "systemd" or (wanted == "auto" and booted()):
        return SystemdDriver(config.state_dir)
    return Supervisor(config.state_dir)


class Agent:
    def __init__(self, config: config_mod.AgentConfig) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        config.services_root.mkdir(parents=True, exist_ok=True)
        self.ops = Operations(Journal(config.state_dir), config.services_root, choose_driver(config))
        self.stopping = asyncio.Event()
        self.ready_sent = False

    def _on_welcome(self) -> None:
        if not self.ready_sent:
            sd_notify("READY=1")
            self.ready_sent = True
        sd_notify(f"STATUS=connected to {self.config.controller}")

    async def run(self) -> None:
        self.ops.recover()
        attempts = 0
        while not self.stopping.is_set():
            channel = grpc.aio.insecure_channel(self.config.controller, options=link.CHANNEL_OPTIONS)
            session = Session(self.config, self.ops, channel)
            task = asyncio.create_task(session.run(self._on_welcome))
            stop = asyncio.create_task(self.stopping.wait())
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
                await channel.close()
            if self.stopping.is_set():
                break
            if session.welcomed:
                attempts = 0
            delay = link.backoff_delay(0 if quick else attempts)
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
    parser.add_argument("--role", action="append", help="computing or daemons (repeatable)")
    parser.add_argument("--capability", action="append", help="an extra capability label (repeatable)")
    parser.add_argument("--provide", action="append",
                        help="what this agent provides to deploys, e.g. mysql.port=3306, "
                             "nginx.conf_dir=/etc/nginx/conf.d (repeatable)")
    parser.add_argument("--state-dir", dest="state_dir", help="journal and spool (default /var/lib/deployer-agent)")
    parser.add_argument("--services-root", dest="services_root", help="default /srv/services")
    parser.add_argument("--heartbeat-interval", dest="heartbeat_interval", type=float)
    parser.add_argument("--service-driver", dest="service_driver", choices=["auto", "systemd", "supervisor"],
                        help="how service processes are run (default auto: systemd where it is PID 1)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--version", action="version", version=f"deployer-agent {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tune_malloc()
    configure_logging(args.log_level)
    try:
        config = config_mod.load(args)
    except config_mod.ConfigError as exc:
        print(f"deployer-agent: {exc}", file=sys.stderr)
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
