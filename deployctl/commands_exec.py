"""Commands run across the fleet, and the operations they make: `exec` with its output followed
live under agent prefixes (resumed when the controller comes back), one line per result, and
`op show` / `op output` for one operation afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import grpc

from protos import deployer_pb2 as pb
from protos import deployer_pb2_grpc as pb_grpc

from common.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from deployctl import render
from deployctl.client import RETRYABLE, CliError, call, connect, rpc_error


# ---------------------------------------------------------------- exec

def describe(result: pb.OperationResult) -> tuple[bool, str]:
    """(success, one line) for an operation's result."""
    took = render.duration(result.duration_s)
    usage = f"{took}, rss {render.size(result.peak_rss_bytes)}, cpu {render.duration(result.cpu_s)}"
    outcome = result.outcome
    if outcome == pb.EXITED and result.exit_code == 0 and not result.error:
        return True, f"ok ({usage})"
    if outcome == pb.EXITED and result.exit_code == 0:
        # The command succeeded but not all of its output was kept: not a success for whoever
        # reads that output (a dump piped to a file), so it counts as failed, and says why.
        return False, f"exit 0 ({usage}), but {result.error}"
    if outcome == pb.EXITED:
        detail = f"exit {result.exit_code}"
        return False, f"failed: {detail} ({usage})" + (f"; {result.error}" if result.error else "")
    if outcome == pb.SIGNALED:
        return False, f"failed: killed by signal {_signame(result.signal)} ({usage})"
    if outcome in (pb.TIMED_OUT, pb.CANCELLED):
        return False, f"{result.error} ({took})"
    return False, f"{pb.Outcome.Name(outcome).lower().replace('_', ' ')}: {result.error}"


def _signame(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


class Follower:
    """Writes followed output with agent prefixes; remembers offsets so it can resume."""

    def __init__(self, ops: dict[str, str], colour: bool) -> None:
        self.ops = ops
        width = max(len(a) for a in ops.values())
        order = sorted(set(ops.values()))
        self.prefixers = {
            (op_id, stream): render.LinePrefixer(render.prefix_for(
                agent, width, order.index(agent) if colour else None))
            for op_id, agent in ops.items() for stream in (pb.STDOUT, pb.STDERR)
        }
        self.offsets = {op_id: 0 for op_id in ops}
        self.results: dict[str, pb.OperationResult] = {}
        self.out = {pb.STDOUT: sys.stdout.buffer, pb.STDERR: sys.stderr.buffer}

    def handle(self, event: pb.FollowEvent) -> None:
        kind = event.WhichOneof("ev")
        if kind == "output":
            chunk = event.output
            if chunk.offset + len(chunk.data) <= self.offsets[chunk.op_id]:
                return
            data = chunk.data[max(0, self.offsets[chunk.op_id] - chunk.offset):]
            stream = chunk.stream if chunk.stream in self.out else pb.STDOUT
            sink = self.out[stream]
            sink.write(self.prefixers[(chunk.op_id, stream)].feed(data))
            sink.flush()
            self.offsets[chunk.op_id] = chunk.offset + len(chunk.data)
        elif kind == "result":
            self._finish(event.result.op_id)
            self.results[event.result.op_id] = event.result
        elif kind == "status" and event.status.note:
            status = event.status
            print(f"{status.agent_id}: {status.note}", file=sys.stderr, flush=True)

    def _finish(self, op_id: str) -> None:
        for stream, sink in self.out.items():
            tail = self.prefixers[(op_id, stream)].finish()
            if tail:
                sink.write(tail)
                sink.flush()

    @property
    def pending(self) -> list[str]:
        return [op_id for op_id in self.ops if op_id not in self.results]


def follow(stub: pb_grpc.OperatorStub, follower: Follower, reconnect_s: float) -> None:
    """Follow until every operation has a result, resuming after the controller comes back."""
    down_since: float | None = None
    while follower.pending:
        request = pb.FollowRequest(op_ids=follower.pending, from_offsets=follower.offsets)
        try:
            for event in stub.Follow(request):
                down_since = None
                follower.handle(event)
            return
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE:
                raise
            now = time.monotonic()
            if down_since is None:
                down_since = now
                print("controller unreachable; waiting for it to come back…", file=sys.stderr, flush=True)
            elif now - down_since > reconnect_s:
                raise CliError(f"the controller did not come back within {reconnect_s:g}s; "
                               f"operations: {', '.join(follower.pending)}", EXIT_UNREACHABLE) from None
            time.sleep(0.5)


def cmd_exec(args: argparse.Namespace) -> int:
    if not args.command:
        raise CliError("no command given: deployctl exec --all -- CMD ARGS…", EXIT_USAGE)
    target = pb.Target(agent_ids=args.agent or [], roles=args.role or [], all=args.all)
    if not (args.agent or args.role or args.all):
        raise CliError("say where to run it: --all, --role ROLE or --agent ID", EXIT_USAGE)
    stub, where = connect(args)
    spec = pb.ExecSpec(argv=args.command, timeout_s=args.timeout or 0, cwd=args.cwd or "",
                       user=args.user or "", env=dict(_parse_env(args.env or [])))
    # A Ctrl-C while the submission is on its way is kept for when its answer is here: by then the
    # operations run, and only their ids let them be cancelled.
    # It stays kept until the part that cancels is entered, wherever it lands before that.
    early: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: early.append(signum))
    try:
        reply = stub.SubmitExec(pb.SubmitExecRequest(target=target, exec=spec), timeout=30)
    except grpc.RpcError as exc:
        signal.signal(signal.SIGINT, previous)
        raise rpc_error(exc, where) from None
    failures = 0
    for op in reply.operations:
        if not op.op_id:
            failures += 1
            print(f"{op.agent_id or 'deployctl'}: {op.error}", file=sys.stderr, flush=True)
    ops = {op.op_id: op.agent_id for op in reply.operations if op.op_id}
    if not ops:
        signal.signal(signal.SIGINT, previous)
        return EXIT_INTERRUPTED if early else EXIT_FAILED
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    follower = Follower(ops, colour)
    interrupted = False
    try:
        signal.signal(signal.SIGINT, previous)
        if early:
            raise KeyboardInterrupt
        follow(stub, follower, args.reconnect_timeout)
    except KeyboardInterrupt:
        interrupted = True
        print("\ncancelling…", file=sys.stderr, flush=True)
        try:
            stub.CancelOperations(pb.CancelRequest(op_ids=follower.pending, reason="interrupted by the operator"),
                                  timeout=10)
            follow(stub, follower, args.reconnect_timeout)
        except grpc.RpcError as exc:
            print(f"deployctl: {rpc_error(exc, where)}", file=sys.stderr)
            return EXIT_INTERRUPTED
    except grpc.RpcError as exc:
        raise rpc_error(exc, where) from None
    for op_id, agent in sorted(ops.items(), key=lambda kv: kv[1]):
        ok, line = describe(follower.results[op_id])
        failures += not ok
        print(f"{agent}: {line}", file=sys.stderr)
    succeeded = len(ops) - sum(1 for r in follower.results.values() if not describe(r)[0])
    print(f"{succeeded} succeeded, {failures} failed", file=sys.stderr, flush=True)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if failures == 0 else EXIT_FAILED


def _parse_env(pairs: list[str]) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise CliError(f"--env {pair!r}: expected NAME=VALUE", EXIT_USAGE)
        out.append((name, value))
    return out


# ---------------------------------------------------------------- operations

def cmd_op_show(args: argparse.Namespace) -> int:
    _, record = call(args, "GetOperation", pb.GetOperationRequest(op_id=args.op_id), 10)
    result = record.result if record.HasField("result") else None
    if args.json:
        data = {"id": record.op_id, "agent": record.agent_id, "kind": record.kind,
                "command": list(record.argv), "state": record.state, "created": record.created,
                "finished": record.finished or None, "output_bytes": record.output_bytes}
        if result is not None:
            data["result"] = {"outcome": pb.Outcome.Name(result.outcome).lower(),
                              "exit_code": result.exit_code, "signal": result.signal,
                              "duration_s": result.duration_s, "peak_rss_bytes": result.peak_rss_bytes,
                              "cpu_s": result.cpu_s, "error": result.error}
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"operation  {record.op_id}\nagent      {record.agent_id}\n"
          f"command    {' '.join(record.argv)}\nstate      {record.state}\n"
          f"output     {render.size(record.output_bytes)}")
    if result is not None:
        print(f"result     {describe(result)[1]}")
    return EXIT_OK


def cmd_op_output(args: argparse.Namespace) -> int:
    """The operation's recorded output, raw (no prefixes): stdout to stdout, stderr to stderr."""
    stub, where = connect(args)
    out = {pb.STDOUT: sys.stdout.buffer, pb.STDERR: sys.stderr.buffer}
    try:
        for event in stub.Follow(pb.FollowRequest(op_ids=[args.op_id])):
            if event.WhichOneof("ev") == "output":
                sink = out.get(event.output.stream, sys.stdout.buffer)
                sink.write(event.output.data)
                sink.flush()
            elif event.WhichOneof("ev") == "result":
                return EXIT_OK if describe(event.result)[0] else EXIT_FAILED
    except grpc.RpcError as exc:
        raise rpc_error(exc, where) from None
    return EXIT_OK
