"""deployctl: the operator's command line. It talks to the controller over its Unix socket, or
over TCP (TLS) with an operator token.

Exit codes: 0 success; 1 an operation or agent failed; 2 bad usage or input; 3 the controller
cannot be reached; 4 the controller refused the credential (none, unknown, revoked, expired, or
a role that does not cover the command); 130 interrupted (Ctrl-C; the operations were cancelled).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import grpc

from common.system import tune_malloc
from protos import deployer_pb2 as pb
from protos import deployer_pb2_grpc as pb_grpc

from common import __version__, errors
from common.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE
from deployctl import channel as operator_channel, render

EXIT_CHANGES = 2  # `plan`: there is something to do
_AGENT_STATES = {pb.AGENT_CONNECTED: "connected", pb.AGENT_DISCONNECTED: "disconnected",
                 pb.AGENT_LOST: "lost"}
RETRYABLE = {grpc.StatusCode.UNAVAILABLE}


class CliError(errors.DeployerError):
    """A one-line error for the operator, with the exit code to leave with."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- connection

def controller_target(args: argparse.Namespace) -> tuple[str, str]:
    """(gRPC target, how to name it to a human)."""
    if args.controller:
        return args.controller, args.controller
    path = Path(args.socket or os.environ.get("DEPLOYER_SOCKET") or "store/control.sock")
    if not path.exists():
        raise CliError(f"cannot reach the controller: no socket at {path} "
                       "(is it running? `make demo` starts one; --socket or DEPLOYER_SOCKET "
                       "point elsewhere)", EXIT_UNREACHABLE)
    return f"unix:{path.resolve()}", str(path)


def connect(args: argparse.Namespace) -> tuple[pb_grpc.OperatorStub, str]:
    target, name = controller_target(args)
    options = [("grpc.max_receive_message_length", 8 << 20)]
    if target.startswith("unix:"):
        return pb_grpc.OperatorStub(grpc.insecure_channel(target, options=options)), name
    try:
        token = operator_channel.read_token(getattr(args, "token_file", None))
        ca_pem = operator_channel.read_ca(target, getattr(args, "ca_file", None), token)
    except operator_channel.ChannelError as exc:
        raise CliError(str(exc), EXIT_UNREACHABLE if exc.unreachable else EXIT_USAGE) from None
    return pb_grpc.OperatorStub(operator_channel.secure_channel(target, token, ca_pem, options)), name


def call(args: argparse.Namespace, method: str, request, timeout: float, order: bool = False):
    """One unary call to the controller: (stub, reply); a gRPC error becomes one line and its exit
    code (`order`: a refused order is an error in the order, exit 1)."""
    stub, where = connect(args)
    try:
        return stub, getattr(stub, method)(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise (_order_error if order else _rpc_error)(exc, where) from None


def _rpc_error(exc: grpc.RpcError, where: str) -> CliError:
    if exc.code() in RETRYABLE:
        return CliError(f"cannot reach the controller at {where}: {exc.details()}", EXIT_UNREACHABLE)
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        return CliError(f"the controller refused the credential ({exc.details()})", EXIT_REFUSED)
    if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
        return CliError(f"not permitted: {exc.details()}", EXIT_REFUSED)
    return CliError(exc.details() or exc.code().name, errors.exit_code(exc.code().name))


# ---------------------------------------------------------------- agents

def cmd_agents(args: argparse.Namespace) -> int:
    _, reply = call(args, "ListAgents", pb.ListAgentsRequest(), 10)
    now = time.time()
    if args.json:
        print(json.dumps([_agent_dict(a) for a in reply.agents], indent=2))
        return EXIT_OK
    if not reply.agents:
        print("no agent has ever connected")
        return EXIT_OK
    rows = []
    for a in reply.agents:
        f = a.facts
        rows.append([
            a.id, ",".join(a.roles), ",".join(a.capabilities) or "-", render.printable(a.address, 40),
            "revoked" if a.revoked else _AGENT_STATES.get(a.state, "?"),
            render.age(now - a.last_seen),
            f"{f.load1:.2f}/{f.cpus}", f"{render.size(f.mem_available_bytes)} free of {render.size(f.mem_total_bytes)}",
            f"{render.size(f.disk_free_bytes)} free", render.printable(a.version, 24),
        ])
    sys.stdout.write(render.table(
        ["ID", "ROLES", "PROVIDES", "ADDRESS", "STATE", "LAST SEEN", "LOAD/CPUS", "MEMORY", "DISK", "VERSION"], rows))
    for a in reply.agents:
        asked = _not_granted(a)
        if asked:
            print(f"{a.id} is configured to provide {','.join(asked)}, not granted (it is not used for it): "
                  f"deployctl agents grant {a.id} --provides {','.join(asked)}", file=sys.stderr)
    return EXIT_OK


def _not_granted(a: pb.AgentInfo) -> list[str]:
    return [c for c in a.claimed if c in ("mysql", "redis", "nginx") and c not in a.granted]


def _provides_list(values: list[str] | None) -> list[str]:
    """--provides mysql,redis --provides nginx → [mysql, redis, nginx]."""
    return [name.strip() for value in values or [] for name in value.split(",") if name.strip()]


def cmd_agents_grant(args: argparse.Namespace) -> int:
    provides = _provides_list(args.provides)
    ungrant = args.agents_command == "ungrant"
    if ungrant and not (provides or args.address):
        raise CliError("say what to take away: --provides NAME[,NAME…] and/or --address", EXIT_USAGE)
    if not ungrant and not (provides or args.address):
        raise CliError("say what to grant: --provides NAME[,NAME…] and/or --address HOST", EXIT_USAGE)
    request = pb.GrantRequest(agent_id=args.agent_id, provides=provides, ungrant=ungrant,
                              address="" if ungrant else args.address or "",
                              clear_address=bool(ungrant and args.address))
    _, reply = call(args, "GrantAgent", request, 10)
    if args.json:
        print(json.dumps({"agent_id": args.agent_id, "granted": list(reply.granted), "address": reply.address,
                          "address_granted": reply.address_granted, "not_granted": list(reply.not_granted)}))
        return EXIT_OK
    address = reply.address + ("" if reply.address_granted else " (the address its link comes from)")
    print(f"{args.agent_id} may provide: {', '.join(reply.granted) or 'nothing'}; address {address}")
    return EXIT_OK


def cmd_agents_revoke(args: argparse.Namespace) -> int:
    _, reply = call(args, "RevokeAgent", pb.RevokeRequest(agent_id=args.agent_id), 10)
    print(f"revoked {reply.certificates} certificate(s) of {args.agent_id}; "
          + ("its session was cut off" if reply.disconnected else "it was not connected"))
    return EXIT_OK


def parse_duration(text: str) -> float:
    """90s, 30m, 1h, 2d, or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise CliError(f"--ttl {text!r}: expected a duration such as 90s, 30m, 1h or 2d", EXIT_USAGE) from None
    if value <= 0:
        raise CliError(f"--ttl {text!r}: must be positive", EXIT_USAGE)
    return value


def cmd_token_create(args: argparse.Namespace) -> int:
    request = pb.TokenRequest(roles=args.role, ttl_s=parse_duration(args.ttl), agent_id=args.agent or "",
                              provides=_provides_list(args.provides), address=args.address or "")
    _, reply = call(args, "CreateToken", request, 10)
    if args.json:
        print(json.dumps({"token": reply.token, "token_id": reply.token_id, "expires_at": reply.expires_at}))
        return EXIT_OK
    print(reply.token)
    print(f"token {reply.token_id}: single use, valid until "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(reply.expires_at))}; "
          f"on the agent: DEPLOYER_TOKEN=TOKEN deployer-agent enroll --config /etc/deployer/agent.yml",
          file=sys.stderr)
    return EXIT_OK


def cmd_token_list(args: argparse.Namespace) -> int:
    _, reply = call(args, "ListTokens", pb.ListTokensRequest(all=args.all), 10)
    tokens = json.loads(reply.json)
    if args.json:
        print(json.dumps(tokens, indent=2))
        return EXIT_OK
    if not tokens:
        print("no token was ever made" if args.all else
              "no token can be used now (--all shows used, expired and revoked ones)")
        return EXIT_OK
    now = time.time()
    when = lambda t: time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))  # noqa: E731
    rows = [[t["id"], ",".join(t["roles"]), ",".join(t.get("provides", [])) or "-", t["agent_id"] or "any",
             when(t["created"]),
             when(t["expires"]) + (f" (in {render.span(t['expires'] - now)})" if t["state"] == "open" else ""),
             t["state"] + (f" by {t['used_by']}" if t["used_by"] else "")] for t in tokens]
    sys.stdout.write(render.table(["ID", "ROLES", "PROVIDES", "AGENT", "CREATED (UTC)", "EXPIRES (UTC)", "STATE"],
                                  rows))
    return EXIT_OK


def cmd_token_revoke(args: argparse.Namespace) -> int:
    call(args, "RevokeToken", pb.TokenRef(token_id=args.token_id), 10)
    print(f"token {args.token_id} revoked: it enrols nothing")
    return EXIT_OK


# ---------------------------------------------------------------- operator tokens

def cmd_operator_token_create(args: argparse.Namespace) -> int:
    ttl = parse_duration(args.ttl) if args.ttl else 0.0
    request = pb.OperatorTokenRequest(role=args.role, ttl_s=ttl, label=args.label or "")
    _, reply = call(args, "CreateOperatorToken", request, 10)
    if args.json:
        print(json.dumps({"token": reply.token, "token_id": reply.token_id, "expires_at": reply.expires_at}))
        return EXIT_OK
    print(reply.token)
    print(f"operator token {reply.token_id} ({args.role}): valid until "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(reply.expires_at))}; it is shown only "
          f"now. Use: DEPLOYER_OPERATOR_TOKEN=TOKEN deployctl --controller HOST:PORT …, or --token-file "
          f"FILE (mode 0600)", file=sys.stderr)
    return EXIT_OK


def cmd_operator_token_list(args: argparse.Namespace) -> int:
    _, reply = call(args, "ListOperatorTokens", pb.ListTokensRequest(all=args.all), 10)
    tokens = json.loads(reply.json)
    if args.json:
        print(json.dumps(tokens, indent=2))
        return EXIT_OK
    if not tokens:
        print("no operator token was ever made" if args.all else
              "no operator token is valid now (--all shows expired and revoked ones)")
        return EXIT_OK
    when = lambda t: time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))  # noqa: E731
    rows = [[t["id"], t["role"], render.printable(t["label"], 32) or "-", t["created_by"],
             when(t["created"]), when(t["expires"]), t["state"]] for t in tokens]
    sys.stdout.write(render.table(["ID", "ROLE", "LABEL", "MADE BY", "CREATED (UTC)", "EXPIRES (UTC)", "STATE"],
                                  rows))
    return EXIT_OK


def cmd_operator_token_revoke(args: argparse.Namespace) -> int:
    _, reply = call(args, "RevokeOperatorToken", pb.TokenRef(token_id=args.token_id), 10)
    others = [t for t in reply.revoked if t != args.token_id]
    print(f"operator token {args.token_id} revoked" + (f", and the tokens it made: {', '.join(others)}"
                                                       if others else ""))
    return EXIT_OK


def add_operator_token_parser(sub) -> None:
    token = sub.add_parser("operator-token", help="credentials for operators on the TCP operator listener",
                           description="Operator tokens let deployctl (or a script) reach the controller "
                                       "over TCP (--operator-listen). Role read: look (agents, jobs, "
                                       "ledger, status, logs); role operate: change anything. Over TCP, "
                                       "only an operate token may manage them.").add_subparsers(
        dest="operator_token_command", metavar="SUBCOMMAND")
    p = token.add_parser("create", help="a new operator token, printed once",
                         description="Make an operator token. It is printed once; only a hash of it is "
                                     "kept. A token made with another token expires no later than it "
                                     "and is revoked with it.",
                         epilog="example: deployctl operator-token create --role read --ttl 30d --label ci")
    p.add_argument("--role", required=True, choices=["read", "operate"], help="read or operate")
    p.add_argument("--ttl", help="how long it is valid: 12h, 30d… (default 30d, at most 366d)")
    p.add_argument("--label", help="who or what holds it, shown by `operator-token list`")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_operator_token_create)
    p = token.add_parser("list", help="operator tokens, never their secret",
                         description="List operator tokens by id: by default the valid ones; --all adds "
                                     "expired and revoked ones.",
                         epilog="example: deployctl operator-token list --all")
    p.add_argument("--all", action="store_true", help="also expired and revoked tokens")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_operator_token_list)
    p = token.add_parser("revoke", help="revoke an operator token at once, and the tokens it made",
                         description="Revoke an operator token: its next call is refused. Tokens made "
                                     "with it are revoked too.",
                         epilog="example: deployctl operator-token revoke 3f2a9c41d0e7")
    p.add_argument("token_id", help="the id `operator-token create` and `operator-token list` show")
    p.set_defaults(func=cmd_operator_token_revoke)


def _agent_dict(a: pb.AgentInfo) -> dict:
    f = a.facts
    return {
        "id": a.id, "roles": list(a.roles), "capabilities": list(a.capabilities),
        "state": _AGENT_STATES.get(a.state, "unknown"), "last_seen": a.last_seen,
        "version": a.version, "peer": a.peer, "running": a.running,
        "certificate_expires": a.certificate_expires or None, "revoked": a.revoked,
        "granted": list(a.granted), "claimed": list(a.claimed), "address": a.address,
        "address_granted": a.address_granted,
        "facts": {"hostname": f.hostname, "cpus": f.cpus, "load": [f.load1, f.load5, f.load15],
                  "mem_total_bytes": f.mem_total_bytes, "mem_available_bytes": f.mem_available_bytes,
                  "disk_free_bytes": f.disk_free_bytes, "disk_total_bytes": f.disk_total_bytes},
    }


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
        raise _rpc_error(exc, where) from None
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
            print(f"deployctl: {_rpc_error(exc, where)}", file=sys.stderr)
            return EXIT_INTERRUPTED
    except grpc.RpcError as exc:
        raise _rpc_error(exc, where) from None
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
        raise _rpc_error(exc, where) from None
    return EXIT_OK


# ---------------------------------------------------------------- orders, jobs, ledger

def _order(args: argparse.Namespace) -> pb.OrderRequest:
    def read(path: str | None) -> tuple[str, str]:
        if not path:
            return "", ""
        try:
            return Path(path).read_text(), path
        except OSError as exc:
            raise CliError(f"{path}: cannot read: {exc.strerror}", EXIT_FAILED) from None
    spec_text, spec_name = read(args.file)
    options_text, options_name = read(getattr(args, "options", None))
    diff_text, diff_name = read(getattr(args, "diff", None))
    base = str(Path(args.file).resolve().parent) if args.file else os.getcwd()
    return pb.OrderRequest(spec_text=spec_text, spec_name=spec_name, options_text=options_text,
                           options_name=options_name, diff_text=diff_text, diff_name=diff_name,
                           environment=getattr(args, "env", "") or "", prune=getattr(args, "prune", False),
                           base_dir=base)


def print_plan(plan: dict) -> None:
    if not plan["services"]:
        print(f"{plan['environment']}: nothing to do")
    for s in plan["services"]:
        parts = []
        for component, c in s["components"].items():
            parts.append(f"{component} " + ("new" if c["new"] else f"reuse {c['instance']}"))
        print(f"{plan['environment']}/{s['service']}: {s['action']} ({', '.join(parts) or 'everything'})")
        for reason in s["reasons"]:
            print(f"    {reason}")
    for note in plan.get("notes", []):
        print(f"note: {note}")


def cmd_plan(args: argparse.Namespace) -> int:
    _, reply = call(args, "Plan", _order(args), 120, order=True)
    plan = json.loads(reply.plan_json)
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print_plan(plan)
    return EXIT_OK if not plan["services"] else EXIT_CHANGES


def _order_error(exc: grpc.RpcError, where: str) -> CliError:
    error = _rpc_error(exc, where)
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        error.code = EXIT_FAILED
    return error


def cmd_apply(args: argparse.Namespace) -> int:
    stub, reply = call(args, "Apply", _order(args), 120, order=True)
    plan = json.loads(reply.plan_json)
    if not reply.job_id:
        print(f"{plan['environment']}: nothing to do")
        return EXIT_OK
    if args.detach:
        print(reply.job_id)
        return EXIT_OK
    print(f"job {reply.job_id}")
    return follow_job(stub, reply.job_id, verbose=False)


def follow_job(stub: pb_grpc.OperatorStub, job_id: str, verbose: bool, counts: dict | None = None) -> int:
    """Print a job's steps as they happen; exit code = the job's outcome. `counts` collects how
    many findings (and findings left after a repair) the job reported."""
    try:
        return _follow_job(stub, job_id, verbose, counts)
    except grpc.RpcError as exc:
        error = _rpc_error(exc, "the controller")
        raise CliError(f"{error}; the job {job_id} goes on: `deployctl job show {job_id}`", error.code) from None


def _follow_job(stub: pb_grpc.OperatorStub, job_id: str, verbose: bool, counts: dict | None) -> int:
    started: dict[str, float] = {}
    state = "running"
    counts = counts if counts is not None else {}
    for event in stub.FollowJob(pb.JobRef(job_id=job_id, follow=True)):
        e = json.loads(event.json)
        name = e["event"]
        if name == "deploy.started":
            made = [f"{c} {e[c]}{'' if c != 'code' or e['code_new'] else ' (reused)'}"
                    for c in ("code", "mysql", "redis") if e.get(c)]
            print(f"{e['service']}: deploy {e['deploy']} on {e['host']}: {', '.join(made)}", flush=True)
        elif name == "step.started":
            started[e["op"]] = e["t"]
            if verbose:
                print(f"  {e['service']}: {e['step']}…", flush=True)
        elif name == "step.finished":
            mark = "ok" if e["ok"] else e["outcome"] + (f" {e['exit_code']}" if e["outcome"] == "exited" else "")
            print(f"  {e['service']}: {e['step']:<16} {mark:<10} {render.duration(e['duration_s'])}", flush=True)
            if e["ok"] and e.get("error"):  # it succeeded, with something to say (lost output)
                print(f"    {e['error']}", flush=True)
        elif name == "step.failed":
            print(f"error: {e['error']}", file=sys.stderr)
            if e.get("tail"):
                print("  " + e["tail"].replace("\n", "\n  "), file=sys.stderr)
        elif name == "job.note":
            print(e["note"], flush=True)
        elif name == "finding":
            key = "left" if e.get("after_repair") else "found"
            counts[key] = counts.get(key, 0) + 1
            print(("still: " if e.get("after_repair") else "") + e["line"], flush=True)
        elif name == "warning":  # said, but not counted: verify's exit code is about drift
            print(f"warning: {e['line']}", file=sys.stderr, flush=True)
        elif name in ("repaired", "clean.planned"):
            print(e["line"], flush=True)
        elif name == "deploy.live":
            where = f" on port {e['port']}" if e.get("port") else ""
            print(f"{e['service']}: code {e['code']} is live{where}", flush=True)
        elif name == "job.finished":
            state = e["state"]
            print(f"job {job_id} {state}: {e['summary']}", file=sys.stderr if state != "succeeded" else sys.stdout)
    return EXIT_OK if state == "succeeded" else EXIT_FAILED


def _env_service(value: str) -> tuple[str, str]:
    parts = value.split("/")
    if len(parts) != 3 or not all(parts):
        raise CliError(f"{value!r}: expected APP/ENVIRONMENT/SERVICE, e.g. shop/prod/web", EXIT_USAGE)
    return "/".join(parts[:2]), parts[2]


def cmd_rollback(args: argparse.Namespace) -> int:
    env, service = _env_service(args.target)
    reload = args.command_name == "reload"
    stub, reply = call(args, "Rollback", pb.RollbackRequest(
        environment=env, service=service, to=getattr(args, "to", None) or 0, reload=reload), 30, order=True)
    if args.detach:
        print(reply.job_id)
        return EXIT_OK
    print(f"job {reply.job_id}")
    return follow_job(stub, reply.job_id, verbose=False)


def cmd_check(args: argparse.Namespace) -> int:
    """verify (exit 0 clean, 2 drift), repair (0 when nothing is left to repair), clean."""
    purge = getattr(args, "purge_data", False)
    if purge and not args.yes:
        if not sys.stdin.isatty():
            raise CliError("--purge-data deletes databases and Redis keys: add --yes to confirm", EXIT_USAGE)
        answer = input(f"This deletes every database and Redis key of {args.env}. Type {args.env} to confirm: ")
        if answer.strip() != args.env:
            raise CliError("not confirmed; nothing was done", EXIT_USAGE)
    stub, reply = call(args, "Check", pb.CheckRequest(
        environment=args.env, action=args.command_name, dry_run=getattr(args, "dry_run", False),
        purge_data=purge), 30, order=True)
    counts: dict[str, int] = {}
    code = follow_job(stub, reply.job_id, verbose=False, counts=counts)
    if code != EXIT_OK:
        return code
    if args.command_name == "verify":
        return EXIT_CHANGES if counts.get("found") else EXIT_OK
    if args.command_name == "repair":
        return EXIT_CHANGES if counts.get("left") else EXIT_OK
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    _, rows = call(args, "ListJobs", pb.EnvRef(environment=args.env or ""), 10)
    rows = json.loads(rows.json)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    now = time.time()
    sys.stdout.write(render.table(["JOB", "ENVIRONMENT", "KIND", "STATE", "STARTED", "SUMMARY"],
                                  [[r["id"], r["env_key"], r["kind"], r["state"], render.age(now - r["created"]),
                                    r["summary"]] for r in rows]))
    return EXIT_OK


def cmd_job_show(args: argparse.Namespace) -> int:
    _, job = call(args, "ShowJob", pb.JobRef(job_id=args.job_id), 10)
    job = json.loads(job.json)
    if args.json:
        print(json.dumps(job, indent=2))
        return EXIT_OK
    print(f"job         {job['id']}\nenvironment {job['env_key']}\nkind        {job['kind']}\n"
          f"state       {job['state']}\nsummary     {job['summary']}\nfolder      {job['folder']}")
    for e in job["events"]:
        if e["event"] == "step.finished":
            print(f"  {e['service']}: {e['step']:<16} {'ok' if e['ok'] else e['outcome']:<10} "
                  f"{render.duration(e['duration_s'])}  {e['op']}")
    return EXIT_OK


def cmd_service_logs(args: argparse.Namespace) -> int:
    """A service's own output, streamed from its agent; follows on to a new instance."""
    env, service = _env_service(args.target)
    stub, where = connect(args)
    out = {pb.STDOUT: sys.stdout.buffer, pb.STDERR: sys.stderr.buffer}
    try:
        for event in stub.ServiceLogs(pb.ServiceLogsRequest(environment=env, service=service, follow=args.follow,
                                                            tail=args.tail or 0)):
            kind = event.WhichOneof("ev")
            if kind == "output":
                sink = out.get(event.output.stream, sys.stdout.buffer)
                sink.write(event.output.data)
                sink.flush()
            elif kind == "status":
                print(f"-- {event.status.note}", file=sys.stderr, flush=True)
    except grpc.RpcError as exc:
        raise _rpc_error(exc, where) from None
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    """A job's events and the output of each of its operations, in order; or, given
    APP/ENV/SERVICE, that service's own output."""
    if "/" in args.job_id:
        args.target = args.job_id
        return cmd_service_logs(args)
    stub, where = connect(args)
    try:
        for event in stub.FollowJob(pb.JobRef(job_id=args.job_id, follow=args.follow)):
            e = json.loads(event.json)
            if e["event"] == "step.finished":
                print(f"== {e['service']}: {e['step']} ({'ok' if e['ok'] else e['outcome']}, {e['op']})", flush=True)
                for out in stub.Follow(pb.FollowRequest(op_ids=[e["op"]])):
                    if out.WhichOneof("ev") == "output":
                        sys.stdout.buffer.write(out.output.data)
                sys.stdout.flush()
            elif e["event"] == "job.finished":
                print(f"== job {e['state']}: {e['summary']}")
    except grpc.RpcError as exc:
        raise _rpc_error(exc, where) from None
    return EXIT_OK


def cmd_ledger(args: argparse.Namespace) -> int:
    _, data = call(args, "Ledger", pb.EnvRef(environment=args.env, service=args.service or ""), 10)
    data = json.loads(data.json)
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    for i, (service, entry) in enumerate(data.items()):
        if len(data) > 1:
            print(("\n" if i else "") + f"{args.env}/{service}")
        sys.stdout.write(entry["diagram"])
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    _, rows = call(args, "Status", pb.EnvRef(environment=args.env), 60)
    rows = json.loads(rows.json)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    table = []
    for r in rows:
        process = f"{r['process']}: {r['error']}" if r.get("error") else r["process"]  # e.g. out of memory
        table.append([r["service"], str(r["code"] or "-"), r["commit"][:10], r["host"], str(r["port"] or "-"),
                      process, r.get("health", "-"),
                      render.size(r["rss_bytes"]) if r.get("rss_bytes") else "-",
                      render.duration(r["cpu_s"]) if r.get("cpu_s") is not None else "-"])
    sys.stdout.write(render.table(["SERVICE", "CODE", "COMMIT", "HOST", "PORT", "PROCESS", "HEALTH", "RSS", "CPU"], table))
    limits = render.limits_table(rows)
    if limits:
        sys.stdout.write(f"\nlimits of {args.env} (per host, all its services there together)\n{limits}")
    return EXIT_OK if all(r["process"] == "running" for r in rows) else EXIT_FAILED


def cmd_secret_set(args: argparse.Namespace) -> int:
    value = sys.stdin.read()
    if value.endswith("\n"):
        value = value[:-1]
    if not value:
        raise CliError("no value on standard input (e.g. `deployctl secret set shop/prod KEY < file`)", EXIT_USAGE)
    call(args, "SetSecret", pb.SecretRequest(environment=args.env, name=args.name, value=value), 10)
    print(f"{args.env}: secret {args.name} set")
    return EXIT_OK


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deployctl", description="Operate the deployer: agents, commands across the fleet.",
        epilog="exit codes: 0 ok, 1 failed, 2 bad usage, 3 controller unreachable, 4 credential refused, "
               "130 interrupted",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)  # or `--token SECRET` would be taken for --token-file, on the command line
    parser.add_argument("--socket", help="controller socket (default $DEPLOYER_SOCKET or store/control.sock)")
    parser.add_argument("--controller", help="controller operator address HOST:PORT instead of the socket")
    parser.add_argument("--token-file", help="with --controller: file holding the operator token (mode 0600; "
                                             "default $DEPLOYER_OPERATOR_TOKEN)")
    parser.add_argument("--ca-file", help="with --controller: the controller's CA (STORE/pki/ca.crt; default "
                                          "$DEPLOYER_CA, else the CA the token names)")
    parser.add_argument("--version", action="version", version=f"deployctl {__version__}")
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND")

    p = sub.add_parser("agents", help="list agents and their state",
                       description="List every agent the controller knows.",
                       epilog="example: deployctl agents --json | jq '.[].state'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_agents)
    agents = p.add_subparsers(dest="agents_command", metavar="SUBCOMMAND")
    r = agents.add_parser("revoke", help="revoke an agent's certificates and cut it off now",
                          description="Revoke every certificate of an agent: its session ends at once "
                                      "and it cannot connect again until enrolled with a new token.",
                          epilog="example: deployctl agents revoke web-3")
    r.add_argument("agent_id")
    r.set_defaults(func=cmd_agents_revoke)
    r = agents.add_parser("grant", help="let an agent provide mysql, redis or nginx, or set its address",
                          description="Grant an agent what it may provide to deploys (its hello only says "
                                      "what it is configured for: an agent is used for a service only "
                                      "when both agree), and the address other hosts reach it at (by "
                                      "default, the address its link comes from). Takes effect at once.",
                          epilog="example: deployctl agents grant db-1 --provides mysql,redis --address 10.0.0.7")
    r.add_argument("agent_id")
    r.add_argument("--provides", action="append", help="mysql, redis, nginx (comma-separated, repeatable)")
    r.add_argument("--address", help="IP address or host name other hosts use to reach its services")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(func=cmd_agents_grant)
    r = agents.add_parser("ungrant", help="take away what an agent may provide, or its granted address",
                          description="Take capabilities away from an agent (it is no longer chosen for "
                                      "them; what it already runs stays), or with --address go back to "
                                      "the address its link comes from.",
                          epilog="example: deployctl agents ungrant web-2 --provides nginx")
    r.add_argument("agent_id")
    r.add_argument("--provides", action="append", help="mysql, redis, nginx (comma-separated, repeatable)")
    r.add_argument("--address", action="store_true", help="forget the granted address")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(func=cmd_agents_grant)

    token = sub.add_parser("token", help="enrolment tokens for new agents").add_subparsers(
        dest="token_command", metavar="SUBCOMMAND")
    p = token.add_parser("create", help="a single-use, expiring enrolment token",
                         description="Make a token that enrols one agent: `DEPLOYER_TOKEN=T deployer-agent "
                                     "enroll` (or in its environment on its first start). An open token "
                                     "cannot take an id that is enrolled; one made with --agent replaces "
                                     "that agent's certificates. It is printed once and only its "
                                     "hash is kept.",
                         epilog="example: deployctl token create --role computing --provides nginx --ttl 1h")
    p.add_argument("--role", action="append", required=True, help="computing or daemons (repeatable)")
    p.add_argument("--ttl", default="1h", help="how long it can be used: 90s, 30m, 1h, 2d (default 1h)")
    p.add_argument("--agent", help="only this agent id may use it")
    p.add_argument("--provides", action="append",
                   help="grant the agent mysql, redis, nginx (comma-separated, repeatable; "
                        "later: deployctl agents grant)")
    p.add_argument("--address", help="grant the address other hosts reach it at (default: its link's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_token_create)
    p = token.add_parser("list", help="the tokens that can still enrol an agent",
                         description="List enrolment tokens by id (never their secret part): by default "
                                     "those that can still be used; --all adds used, expired and revoked ones.",
                         epilog="example: deployctl token list --all")
    p.add_argument("--all", action="store_true", help="also used, expired and revoked tokens")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_token_list)
    p = token.add_parser("revoke", help="make an unused token worthless",
                         description="Spend a token nobody has used, so it enrols nothing. A token that "
                                     "was used already made an agent: revoke that agent instead.",
                         epilog="example: deployctl token revoke 3f2a9c41d0e7")
    p.add_argument("token_id", help="the id `token create` and `token list` show")
    p.set_defaults(func=cmd_token_revoke)

    p = sub.add_parser("exec", help="run a command on agents, streaming its output",
                       description="Run a command on agents and stream every line as it is produced, "
                                   "prefixed by the agent id. Ctrl-C cancels it everywhere.",
                       epilog="example: deployctl exec --role computing --timeout 30 -- uptime")
    p.add_argument("--all", action="store_true", help="every connected agent")
    p.add_argument("--role", action="append", help="agents with this role (repeatable)")
    p.add_argument("--agent", action="append", help="this agent id (repeatable)")
    p.add_argument("--timeout", type=float, help="seconds before the command is stopped")
    p.add_argument("--cwd", help="working directory on the agent (default: its services root)")
    p.add_argument("--user", help="run as this Unix user")
    p.add_argument("--env", action="append", help="NAME=VALUE added to the command's environment")
    p.add_argument("--reconnect-timeout", type=float, default=60.0,
                   help="how long to wait for a restarting controller (default 60s)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS…")
    p.set_defaults(func=cmd_exec)

    op = sub.add_parser("op", help="inspect an operation",
                        description="Inspect one operation by id.").add_subparsers(dest="op_command", metavar="SUBCOMMAND")
    p = op.add_parser("show", help="state and result", epilog="example: deployctl op show op-20261125T091502-3f9a1c2e")
    p.add_argument("op_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_op_show)
    p = op.add_parser("output", help="the recorded output, raw; follows until it ends",
                      epilog="example: deployctl op output op-20261125T091502-3f9a1c2e | less")
    p.add_argument("op_id")
    p.set_defaults(func=cmd_op_output)

    p = sub.add_parser("plan", help="what applying a spec would change (exit 0: nothing, 2: changes, 1: error)",
                       description="Plan an order without running it.",
                       epilog="example: deployctl plan examples/shop/environment.yml --options deploy-options.yml")
    p.add_argument("file", nargs="?", help="environment spec (YAML)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--options", help="deploy-options.yml: limit services, renew components, override refs")
    group.add_argument("--diff", help="environment-diff.yml merged over the stored spec")
    p.add_argument("--env", help="APP/ENVIRONMENT, with --diff and no spec file")
    p.add_argument("--prune", action="store_true", help="destroy services no longer in the spec")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", help="run an order as a job, showing its steps live",
                       description="Apply an order: plan it and run the plan as a job.",
                       epilog="example: deployctl apply examples/shop/environment.yml")
    p.add_argument("file", nargs="?", help="environment spec (YAML)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--options")
    group.add_argument("--diff")
    p.add_argument("--env", help="APP/ENVIRONMENT, with --diff and no spec file")
    p.add_argument("--prune", action="store_true")
    p.add_argument("--detach", action="store_true", help="print the job id and return at once")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("jobs", help="recent jobs", epilog="example: deployctl jobs --env shop/prod")
    p.add_argument("--env")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs)

    job = sub.add_parser("job", help="inspect a job").add_subparsers(dest="job_command", metavar="SUBCOMMAND")
    p = job.add_parser("show", help="a job's state and steps", epilog="example: deployctl job show job-20261125T101500-a1b2c3")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_job_show)

    p = sub.add_parser("logs", help="a job's steps and operation output, or a service's own output",
                       description="deployctl logs JOB: the job's steps and the full output of each operation. "
                                   "deployctl logs APP/ENV/SERVICE: the service's own output from its agent; "
                                   "with -f it keeps following, onto the new instance after a redeploy.",
                       epilog="examples: deployctl logs job-20261125T101500-a1b2c3 | deployctl logs shop/prod/web -f")
    p.add_argument("job_id", metavar="JOB | APP/ENV/SERVICE")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--tail", type=int, help="service logs: lines of the past to show first (default 20)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("ledger", help="which instance of each component every deploy made or reused",
                       epilog="example: deployctl ledger shop/prod api")
    p.add_argument("env", help="APP/ENVIRONMENT")
    p.add_argument("service", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser("status", help="live instance, host, port, health, RSS and CPU of each service, "
                                      "and the environment's use of its limits",
                       epilog="example: deployctl status shop/prod")
    p.add_argument("env", help="APP/ENVIRONMENT")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("rollback", help="start an older code instance again; data is never touched",
                       description="Roll a service back to an older code instance still on disk: start it, "
                                   "health check, switch the route, stop the current one. Recorded as a new "
                                   "deploy that reuses that code instance. Databases and Redis stay as they are.",
                       epilog="example: deployctl rollback shop/prod/web --to 3")
    p.add_argument("target", metavar="APP/ENV/SERVICE")
    p.add_argument("--to", type=int, help="code instance number (default: the newest one older than the live one)")
    p.add_argument("--detach", action="store_true")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("reload", help="restart the live instance blue/green, with no failed request",
                       description="Start the live code instance again on a fresh port, health check, switch, "
                                   "stop the old process.",
                       epilog="example: deployctl reload shop/prod/web")
    p.add_argument("target", metavar="APP/ENV/SERVICE")
    p.add_argument("--detach", action="store_true")
    p.set_defaults(func=cmd_rollback)

    checks = {
        "verify": ("compare the ledger with reality (exit 0 clean, 2 drift)",
                   "Check every component of the environment against the ledger, and list orphans in our "
                   "namespaces. One line per finding.", ""),
        "repair": ("converge what verify finds, never deleting data",
                   "Restart dead instances, rewrite routes, recreate missing users with their recorded names; "
                   "then verify again (exit 0 when nothing is left).", ""),
        "clean": ("remove failed and surplus releases and orphans in our namespaces",
                  "Lists what it removes before acting; --dry-run only lists.", " --dry-run"),
    }
    for name, (summary, description, example) in checks.items():
        p = sub.add_parser(name, help=summary, description=description,
                           epilog=f"example: deployctl {name} shop/prod{example}")
        p.add_argument("env", help="APP/ENVIRONMENT")
        if name == "clean":
            p.add_argument("--dry-run", action="store_true")
        p.set_defaults(func=cmd_check)

    p = sub.add_parser("destroy", help="remove an environment; data is kept unless --purge-data",
                       description="Stop every process of the environment, remove its nginx route and its "
                                   "folders. Databases and Redis keys are kept unless --purge-data, which asks "
                                   "for confirmation (or --yes). The ledger keeps the history.",
                       epilog="example: deployctl destroy shop/pr-42 --purge-data --yes")
    p.add_argument("env", help="APP/ENVIRONMENT")
    p.add_argument("--purge-data", action="store_true", help="also drop databases, ACL users and keys")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_check)

    add_operator_token_parser(sub)

    secret = sub.add_parser("secret", help="set secret values").add_subparsers(dest="secret_command", metavar="SUBCOMMAND")
    p = secret.add_parser("set", help="set a secret from standard input",
                          epilog="example: printf %%s \"$KEY\" | deployctl secret set shop/prod SESSION_KEY")
    p.add_argument("env", help="APP/ENVIRONMENT")
    p.add_argument("name")
    p.set_defaults(func=cmd_secret_set)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tune_malloc()
    if getattr(args, "command", None) and args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except CliError as exc:
        print(f"deployctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
