"""The commands that change an environment: plan and apply an order, roll a service back or reload
it, verify, repair, clean or destroy, and set a secret; and the following of the job each of them
starts, step by step, until it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import grpc

from protos import deployer_pb2 as pb
from protos import deployer_pb2_grpc as pb_grpc

from common.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from deployctl import render
from deployctl.client import CliError, call, call_json, env_service, rpc_error

EXIT_CHANGES = 2  # `plan`: there is something to do


# ---------------------------------------------------------------- orders

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
            if c.get("of"):  # another service's instance: its new one, or its live one
                parts.append(f"{component} of {c['of']}" + (f" ({c['instance']})" if c["instance"] else " (new)"))
            else:
                parts.append(f"{component} " + ("new" if c["new"] else f"reuse {c['instance']}"))
        print(f"{plan['environment']}/{s['service']}: {s['action']} ({', '.join(parts) or 'everything'})")
        for reason in s["reasons"]:
            print(f"    {reason}")
        placement = plan.get("placement", {})
        for key in [s["service"], *sorted((k for k in placement if k.partition("#")[0] == s["service"] and "#" in k),
                                          key=lambda k: int(k.partition("#")[2]))]:
            placed = placement.get(key)
            if placed:
                print(f"    on {placed['host']}: {placed['why']}" if placed["host"] else f"    {placed['why']}")
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
        error = rpc_error(exc, "the controller")
        raise CliError(f"{error}; the job {job_id} goes on: `deployctl job show {job_id}`", error.code) from None


def _follow_job(stub: pb_grpc.OperatorStub, job_id: str, verbose: bool, counts: dict | None) -> int:
    started: dict[str, float] = {}
    state = "running"
    counts = counts if counts is not None else {}
    for event in stub.FollowJob(pb.JobRef(job_id=job_id, follow=True)):
        e = json.loads(event.json)
        name = e["event"]
        if name == "deploy.started":
            shared = e.get("shared", {})
            made = [f"{c} {shared[c] + ':' if c in shared else ''}{e[c]}{'' if c != 'code' or e['code_new'] else ' (reused)'}"
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


# ---------------------------------------------------------------- day-2

def cmd_rollback(args: argparse.Namespace) -> int:
    env, service = env_service(args.target)
    reload = args.command_name == "reload"
    stub, reply = call(args, "Rollback", pb.RollbackRequest(
        environment=env, service=service, to=getattr(args, "to", None) or 0, reload=reload), 30, order=True)
    if args.detach:
        print(reply.job_id)
        return EXIT_OK
    print(f"job {reply.job_id}")
    return follow_job(stub, reply.job_id, verbose=False)


def cmd_backup(args: argparse.Namespace) -> int:
    env, service = env_service(args.target)
    stub, reply = call(args, "Backup", pb.BackupRequest(environment=env, service=service), 30, order=True)
    print(f"job {reply.job_id}")
    return follow_job(stub, reply.job_id, verbose=False)


def cmd_backups(args: argparse.Namespace) -> int:
    env, service = env_service(args.target)
    rows = call_json(args, "Backups", pb.EnvRef(environment=env, service=service), 60)
    if rows is None:
        return EXIT_OK
    table = [[b["id"], f"mysql {b['mysql']}" + (" (live)" if b["live"] else ""), render.size(b["bytes"]),
              render.span(time.time() - b["taken"]) + " ago"] for b in rows]
    sys.stdout.write(render.table(["SNAPSHOT", "OF", "SIZE", "TAKEN"], table) if table else
                     f"{args.target}: no snapshot yet (one is taken before each migrate; deployctl backup takes one)\n")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    env, service = env_service(args.target)
    warning = (f"This makes a new MySQL instance for {args.target} from snapshot {args.snapshot} and switches every "
               "service using the live one to it: writes made after the snapshot are not in it (the live instance "
               "is kept, as standby).")
    print(warning, file=sys.stderr)
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError("add --yes to restore (writes made after the snapshot are left behind)", EXIT_USAGE)
        if input(f"Type {args.snapshot} to confirm: ").strip() != args.snapshot:
            raise CliError("not confirmed; nothing was done", EXIT_USAGE)
    stub, reply = call(args, "Backup", pb.BackupRequest(environment=env, service=service,
                                                        restore_from=args.snapshot), 30, order=True)
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


def cmd_secret_set(args: argparse.Namespace) -> int:
    value = sys.stdin.read()
    if value.endswith("\n"):
        value = value[:-1]
    if not value:
        raise CliError("no value on standard input (e.g. `deployctl secret set shop/prod KEY < file`)", EXIT_USAGE)
    call(args, "SetSecret", pb.SecretRequest(environment=args.env, name=args.name, value=value), 10)
    print(f"{args.env}: secret {args.name} set")
    return EXIT_OK
