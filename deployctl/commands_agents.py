"""The commands about who may take part: agents (list, grant, ungrant, revoke), the enrolment
tokens that let a new agent join, and the operator tokens that let deployctl reach the controller
over TCP.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from protos import deployer_pb2 as pb

from common import sizes
from common.errors import EXIT_OK, EXIT_USAGE
from deployctl import render
from deployctl.client import CliError, call, call_json

_AGENT_STATES = {pb.AGENT_CONNECTED: "connected", pb.AGENT_DISCONNECTED: "disconnected",
                 pb.AGENT_LOST: "lost"}


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
            f"{render.size(f.disk_free_bytes)} free", _placed(a), render.printable(a.version, 24),
        ])
    sys.stdout.write(render.table(
        ["ID", "ROLES", "PROVIDES", "ADDRESS", "STATE", "LAST SEEN", "LOAD/CPUS", "MEMORY", "DISK", "PLACED",
         "VERSION"], rows))
    for a in reply.agents:
        asked = _not_granted(a)
        if asked:
            print(f"{a.id} is configured to provide {','.join(asked)}, not granted (it is not used for it): "
                  f"deployctl agents grant {a.id} --provides {','.join(asked)}", file=sys.stderr)
    return EXIT_OK


def _placed(a: pb.AgentInfo) -> str:
    """Instances placed there, and what their environments reserve of what it may hand out."""
    room = f"{render.size(a.reserved_memory_bytes)}/{render.size(a.capacity_memory_bytes)}" \
        if a.capacity_memory_bytes else ""
    labels = ",".join(f"{k}={v}" for k, v in sorted(a.labels.items()))
    return " ".join(x for x in (f"{a.instances}", room, labels) if x)


def _not_granted(a: pb.AgentInfo) -> list[str]:
    return [c for c in a.claimed if c in ("mysql", "redis", "nginx") and c not in a.granted]


def _provides_list(values: list[str] | None) -> list[str]:
    """--provides mysql,redis --provides nginx → [mysql, redis, nginx]."""
    return [name.strip() for value in values or [] for name in value.split(",") if name.strip()]


def parse_capacity(text: str) -> tuple[int, float]:
    """memory=16G,cpu=8 → (bytes, CPUs); either may be left out."""
    memory, cpu = 0, 0.0
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, _, value = part.partition("=")
        if key == "memory" and (size := sizes.parse(value, strict=True)) is not None:
            memory = int(size)
        elif key == "cpu" and re.fullmatch(r"\d+(\.\d+)?", value) and 0 < float(value) <= 4096:
            cpu = float(value)
        else:
            raise CliError(f"--capacity {part!r}: expected memory=SIZE (like 16G) and/or cpu=N (like 8)", EXIT_USAGE)
    if not (memory or cpu):
        raise CliError(f"--capacity {text!r}: expected memory=SIZE (like 16G) and/or cpu=N (like 8)", EXIT_USAGE)
    return memory, cpu


def _labels(values: list[str] | None) -> dict[str, str]:
    out = {}
    for value in values or []:
        key, equals, label = value.partition("=")
        if not equals or not key or not label:
            raise CliError(f"--label {value!r}: expected KEY=VALUE, like zone=eu-1", EXIT_USAGE)
        out[key] = label
    return out


def cmd_agents_grant(args: argparse.Namespace) -> int:
    provides = _provides_list(args.provides)
    ungrant = args.agents_command == "ungrant"
    if ungrant and not (provides or args.address or args.capacity or args.label):
        raise CliError("say what to take away: --provides NAME[,NAME…], --address, --capacity or --label KEY",
                       EXIT_USAGE)
    if not ungrant and not (provides or args.address or args.capacity or args.label):
        raise CliError("say what to grant: --provides NAME[,NAME…], --address HOST, --capacity memory=SIZE,cpu=N "
                       "or --label KEY=VALUE", EXIT_USAGE)
    memory, cpu = parse_capacity(args.capacity) if args.capacity and not ungrant else (0, 0.0)
    request = pb.GrantRequest(agent_id=args.agent_id, provides=provides, ungrant=ungrant,
                              address="" if ungrant else args.address or "",
                              clear_address=bool(ungrant and args.address),
                              memory_bytes=memory, cpu=cpu, labels={} if ungrant else _labels(args.label),
                              unlabel=(args.label or []) if ungrant else [], clear_capacity=bool(ungrant and args.capacity))
    _, reply = call(args, "GrantAgent", request, 10)
    if args.json:
        print(json.dumps({"agent_id": args.agent_id, "granted": list(reply.granted), "address": reply.address,
                          "address_granted": reply.address_granted, "not_granted": list(reply.not_granted),
                          "capacity": {"memory_bytes": reply.memory_bytes, "cpu": reply.cpu},
                          "labels": dict(reply.labels)}))
        return EXIT_OK
    address = reply.address + ("" if reply.address_granted else " (the address its link comes from)")
    print(f"{args.agent_id} may provide: {', '.join(reply.granted) or 'nothing'}; address {address}")
    if args.capacity or args.label:  # asked about placement: what it counts on now
        capacity = ", ".join(x for x in (f"{render.size(reply.memory_bytes)} memory" if reply.memory_bytes else "",
                                         f"{reply.cpu:g} CPUs" if reply.cpu else "") if x)
        print(f"placement counts on: {capacity or 'what it measures (not known yet)'}; labels: "
              + (", ".join(f"{k}={v}" for k, v in sorted(reply.labels.items())) or "none"))
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
    tokens = call_json(args, "ListTokens", pb.ListTokensRequest(all=args.all), 10)
    if tokens is None:
        return EXIT_OK
    if not tokens:
        print("no token was ever made" if args.all else
              "no token can be used now (--all shows used, expired and revoked ones)")
        return EXIT_OK
    now = time.time()
    when = render.utc_minute
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
    tokens = call_json(args, "ListOperatorTokens", pb.ListTokensRequest(all=args.all), 10)
    if tokens is None:
        return EXIT_OK
    if not tokens:
        print("no operator token was ever made" if args.all else
              "no operator token is valid now (--all shows expired and revoked ones)")
        return EXIT_OK
    when = render.utc_minute
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


def _agent_dict(a: pb.AgentInfo) -> dict:
    f = a.facts
    return {
        "id": a.id, "roles": list(a.roles), "capabilities": list(a.capabilities),
        "state": _AGENT_STATES.get(a.state, "unknown"), "last_seen": a.last_seen,
        "version": a.version, "peer": a.peer, "running": a.running,
        "certificate_expires": a.certificate_expires or None, "revoked": a.revoked,
        "granted": list(a.granted), "claimed": list(a.claimed), "address": a.address,
        "address_granted": a.address_granted, "labels": dict(a.labels),
        "capacity": {"memory_bytes": a.capacity_memory_bytes, "cpu": a.capacity_cpu},
        "reserved": {"memory_bytes": a.reserved_memory_bytes, "cpu": a.reserved_cpu}, "instances": a.instances,
        "facts": {"hostname": f.hostname, "cpus": f.cpus, "load": [f.load1, f.load5, f.load15],
                  "mem_total_bytes": f.mem_total_bytes, "mem_available_bytes": f.mem_available_bytes,
                  "disk_free_bytes": f.disk_free_bytes, "disk_total_bytes": f.disk_total_bytes},
    }
