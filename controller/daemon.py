"""deployer-controller: serve agents (gateway) and operators (Unix socket) from one store."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import structlog

from agent.system import configure_logging, sd_notify, tune_malloc
from protos import deployer_pb2_grpc as pb_grpc

from . import __version__
from .db import Database
from .dispatcher import Dispatcher
from .environments import Environments
from .ledger import Ledger
from .gateway import AgentGateway
from .operator_service import OperatorService
from .registry import Registry

log = structlog.get_logger("controller")

# Must stay consistent with the agent's keepalive (agent/link.py): agents ping every 20 s, and we
# accept pings down to every 10 s so that an agent is never answered GOAWAY too_many_pings.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_send_message_length", 8 << 20),
]
DEFAULT_LISTEN = "127.0.0.1:7710"


def default_store() -> Path:
    return Path(os.environ.get("DEPLOYER_STORE") or Path.cwd() / "store")


class StartupError(Exception):
    """The controller cannot start; the message says why in one line."""


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
                 lost_after: float) -> None:
        self.store = store
        self.socket_path = socket_path
        self.listen = listen
        self.operator_listen = operator_listen
        self.lost_after = lost_after
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        os.chmod(self.store, 0o700)
        lock = _lock_store(self.store)
        db = Database(self.store / "deployer.db")
        registry = Registry(db, self.lost_after)
        dispatcher = Dispatcher(db, registry, self.store)
        environments = Environments(self.store, dispatcher, registry, Ledger(db))
        agents = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_AgentGatewayServicer_to_server(AgentGateway(registry, dispatcher), agents)
        operators = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_OperatorServicer_to_server(OperatorService(registry, dispatcher, environments), operators)
        try:
            if not agents.add_insecure_port(self.listen):
                raise StartupError(f"cannot listen for agents on {self.listen}")
        except RuntimeError as exc:
            raise StartupError(f"cannot listen for agents on {self.listen}: {exc}") from None
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)  # stale: the store lock proves nobody serves it
        operators.add_insecure_port(f"unix:{self.socket_path}")
        if self.operator_listen:
            operators.add_insecure_port(self.operator_listen)
        await agents.start()
        await operators.start()
        os.chmod(self.socket_path, 0o600)
        sweeper = asyncio.create_task(registry.sweeper())
        log.info("controller.started", version=__version__, store=str(self.store),
                 listen=self.listen, socket=str(self.socket_path), pid=os.getpid())
        sd_notify("READY=1")
        sd_notify(f"STATUS=serving agents on {self.listen}")
        await self.stopping.wait()

        sd_notify("STOPPING=1")
        log.info("controller.stopping")
        registry.close_all("the controller is shutting down")
        await asyncio.sleep(0.2)  # let the goodbyes go out
        await operators.stop(1.0)
        await agents.stop(2.0)
        sweeper.cancel()
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
    parser.add_argument("--operator-listen", help="also serve operators on this TCP address")
    parser.add_argument("--lost-after", type=float, default=60.0,
                        help="seconds without contact before a disconnected agent is lost (default 60)")
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
    controller = Controller(store, (args.socket or store / "control.sock").resolve(), args.listen,
                            args.operator_listen, args.lost_after)

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
