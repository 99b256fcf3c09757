"""One connected session with the controller: hello, then operations in, output and results out.

One task reads the controller's messages, one writes everything the agent sends (gRPC allows a
single writer per stream), one pump per operation feeds output from its spool, and a heartbeat
task reports liveness and host facts.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import structlog

from protos import deployer_pb2 as pb
from protos import deployer_pb2_grpc as pb_grpc

from agent import facts, probe
from common import __version__
from agent.config import AgentConfig
from agent.operations import Held, Operations

log = structlog.get_logger("agent")
OUTBOX_MESSAGES = 8  # bounds what is in memory on its way out (≤ 8 chunks of ≤ 1 MiB)
CHUNK_BYTES = 1 << 20
# A controller whose disk is full asks for output again: sending it at once would only stream the
# spool into a disk that has no room yet.
RESEND_AFTER_S = 1.0


class SessionEnded(Exception):
    """The controller said goodbye (it is restarting): reconnect soon."""


class Session:
    def __init__(self, config: AgentConfig, ops: Operations, channel: grpc.aio.Channel) -> None:
        self.config = config
        self.ops = ops
        self.stub = pb_grpc.AgentGatewayStub(channel)
        self.outbox: asyncio.Queue[pb.AgentMessage] = asyncio.Queue(OUTBOX_MESSAGES)
        self.pumps: dict[str, asyncio.Task] = {}
        self.told: set[asyncio.Task] = set()
        self.probing: asyncio.Task | None = None   # one round of health checks at a time
        self.welcomed = False
        self.started = time.monotonic()

    async def run(self, on_welcome) -> None:
        call = self.stub.Connect()
        tasks: list[asyncio.Task] = []
        try:
            await call.write(pb.AgentMessage(hello=self._hello()))
            first = await call.read()
            if first is grpc.aio.EOF or first.WhichOneof("msg") != "welcome":
                raise ConnectionError("the controller did not welcome the agent")
            self.welcomed = True
            log.info("agent.connected", controller=self.config.controller,
                     held=len(self.ops.held))
            on_welcome()
            tasks = [asyncio.create_task(self._writer(call)), asyncio.create_task(self._heartbeats())]
            for held in list(self.ops.held.values()):
                self._start_pump(held)
            await self._reader(call)
        finally:
            if self.probing is not None:
                tasks.append(self.probing)
            for task in [*tasks, *self.pumps.values()]:
                task.cancel()
            await asyncio.gather(*tasks, *self.pumps.values(), return_exceptions=True)
            call.cancel()

    def tell(self, message: pb.AgentMessage) -> None:
        """Queue a message of the agent's own (not an operation's), waiting for room in the outbox
        rather than dropping it behind a large output."""
        task = asyncio.get_running_loop().create_task(self.outbox.put(message))
        self.told.add(task)
        task.add_done_callback(self.told.discard)

    def _hello(self) -> pb.Hello:
        return pb.Hello(
            agent_id=self.config.id, roles=self.config.roles,
            capabilities=self.config.capabilities, version=__version__,
            facts=facts.gather(self.config.services_root), held=self.ops.summary(),
            heartbeat_interval_s=int(self.config.heartbeat_interval),
            services_root=str(self.config.services_root),
            settings=dict(self.config.settings), service_driver=self.ops.driver.name,
        )

    async def _reader(self, call) -> None:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                return
            kind = message.WhichOneof("msg")
            if kind == "operation":
                await self._on_operation(message.operation)
            elif kind == "ack":
                self.ops.ack(message.ack.op_id, message.ack.offset, message.ack.result)
                if message.ack.resend:
                    self._resend(message.ack.op_id, message.ack.offset)
            elif kind == "cancel":
                self.ops.cancel(message.cancel.op_id, message.cancel.reason)
            elif kind == "probe":
                self._on_probe(message.probe)
            elif kind == "goodbye":
                raise SessionEnded(message.goodbye.reason)

    def _on_probe(self, message: pb.Probe) -> None:
        """A round of health checks: answered when done; one still running makes this one wait
        for the controller's next (a slow round is never stacked on another)."""
        if self.probing is not None and not self.probing.done():
            log.info("probe.skipped", round=message.round)
            return

        async def run() -> None:
            report = await probe.check_round(message)
            await self.outbox.put(pb.AgentMessage(probe_report=report))

        self.probing = asyncio.create_task(run())

    async def _on_operation(self, operation: pb.Operation) -> None:
        held, duplicate, rejection = self.ops.receive(operation)
        if held is None:
            await self.outbox.put(pb.AgentMessage(result=pb.OperationResult(
                op_id=operation.id, outcome=pb.REJECTED, error=rejection)))
            return
        if duplicate:
            log.info("op.duplicate", op_id=operation.id)
        await self.outbox.put(pb.AgentMessage(accepted=pb.Accepted(op_id=operation.id, duplicate=duplicate)))
        self._start_pump(held)

    def _start_pump(self, held: Held) -> None:
        pump = self.pumps.get(held.op_id)
        if pump is None or pump.done():
            self.pumps[held.op_id] = asyncio.create_task(self._pump(held))

    def _resend(self, op_id: str, offset: int) -> None:
        """The controller could not keep the output after `offset`: send it again from there."""
        held = self.ops.held.get(op_id)
        if held is None:
            return
        log.info("op.resend_requested", op_id=op_id, offset=offset)
        pump = self.pumps.get(op_id)
        if pump is not None:
            pump.cancel()  # what it queued already is dropped by the controller
        self.pumps[op_id] = asyncio.create_task(self._pump(held, max(offset, held.acked_offset), RESEND_AFTER_S))

    async def _pump(self, held: Held, start: int | None = None, pause: float = 0.0) -> None:
        """Send the operation's output from what the controller has confirmed, then its result."""
        cursor = held.acked_offset if start is None else start
        if pause:
            await asyncio.sleep(pause)
        while True:
            held.wake.clear()
            records = held.spool.read(cursor, CHUNK_BYTES)
            for record in records:
                await self.outbox.put(pb.AgentMessage(output=pb.OutputChunk(
                    op_id=held.op_id, seq=record.seq, offset=record.offset,
                    stream=record.stream, data=record.data)))
                cursor = record.end
            if records:
                continue
            if held.result is not None and cursor >= held.result.output_bytes:
                await self.outbox.put(pb.AgentMessage(result=held.result))
                return
            await held.wake.wait()

    async def _writer(self, call) -> None:
        while True:
            message = await self.outbox.get()
            await call.write(message)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            await self.outbox.put(pb.AgentMessage(heartbeat=pb.Heartbeat(
                facts=facts.gather(self.config.services_root), running=self.ops.running)))
