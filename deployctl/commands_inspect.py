"""The commands that look at jobs and environments without changing them: recent jobs, one job,
the logs of a job or of a service, the ledger of what every deploy made or reused, and the live
status of each service.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone

import grpc

from protos import deployer_pb2 as pb

from common import moments
from common.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from deployctl import render
from deployctl.client import CliError, call, call_json, connect, env_service, rpc_error


def cmd_jobs(args: argparse.Namespace) -> int:
    rows = call_json(args, "ListJobs", pb.EnvRef(environment=args.env or ""), 10)
    if rows is None:
        return EXIT_OK
    now = time.time()
    sys.stdout.write(render.table(["JOB", "ENVIRONMENT", "KIND", "STATE", "STARTED", "SUMMARY"],
                                  [[r["id"], r["env_key"], r["kind"], r["state"], render.age(now - r["created"]),
                                    r["summary"]] for r in rows]))
    return EXIT_OK


def cmd_job_show(args: argparse.Namespace) -> int:
    job = call_json(args, "ShowJob", pb.JobRef(job_id=args.job_id), 10)
    if job is None:
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
    env, service = env_service(args.target)
    now = datetime.now(timezone.utc)
    bounds = {}
    for flag in ("since", "until"):
        try:
            bounds[flag] = moments.parse(getattr(args, flag), now) if getattr(args, flag) else ""
        except moments.MomentError as exc:
            raise CliError(f"logs {args.target}: --{flag}: {exc}", EXIT_USAGE) from None
    since, until = bounds["since"], bounds["until"]
    stub, where = connect(args)
    out = {pb.STDOUT: sys.stdout.buffer, pb.STDERR: sys.stderr.buffer}
    try:
        for event in stub.ServiceLogs(pb.ServiceLogsRequest(environment=env, service=service, follow=args.follow,
                                                            tail=args.tail or 0, instance=args.instance or 0,
                                                            since=since, until=until,
                                                            timestamps=args.timestamps)):
            kind = event.WhichOneof("ev")
            if kind == "output":
                sink = out.get(event.output.stream, sys.stdout.buffer)
                sink.write(event.output.data)
                sink.flush()
            elif kind == "status":
                print(f"-- {event.status.note}", file=sys.stderr, flush=True)
    except grpc.RpcError as exc:
        raise rpc_error(exc, where) from None
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
        raise rpc_error(exc, where) from None
    return EXIT_OK


def cmd_ledger(args: argparse.Namespace) -> int:
    data = call_json(args, "Ledger", pb.EnvRef(environment=args.env, service=args.service or ""), 10)
    if data is None:
        return EXIT_OK
    for i, (service, entry) in enumerate(data.items()):
        if len(data) > 1:
            print(("\n" if i else "") + f"{args.env}/{service}")
        sys.stdout.write(entry["diagram"])
    return EXIT_OK


def event_line(e: dict) -> str:
    """One event of an environment's history, as `deployctl events` prints it."""
    what = {"exited": lambda: f"process {e.get('process')} on {e.get('host')} ended: {e.get('why')}",
            "restarting": lambda: f"restart ordered ({e.get('job')})",
            "restarted": lambda: f"restarted: code {e.get('code')} on port {e.get('port')} ({e.get('job')})",
            "restart-failed": lambda: f"restart failed ({e.get('job')}): {e.get('why')}",
            "crash-loop": lambda: f"crash loop: {e.get('why')}",
            "left": lambda: f"process {e.get('process')} ended and is left stopped ({e.get('why')})",
            "agent-lost": lambda: (f"agent {e.get('host')} is lost; its process {e.get('process')} is moved only if it "
                                   "is a web service's and the host stays lost (health.replace_after)"),
            "replacing": lambda: f"moving off {e.get('host')}: {e.get('why')} ({e.get('job')})",
            "moved": lambda: f"moved off {e.get('host')}: now on {', '.join(e.get('to') or []) or '?'} ({e.get('job')})",
            "stopped": lambda: f"stopped process {e.get('process')} on {e.get('host')}: {e.get('why')}",
            "move-failed": lambda: f"could not move off {e.get('host')} ({e.get('job')}): {e.get('why')}"}
    text = what.get(e["kind"], lambda: e["kind"])()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["t"]))
    return f"{stamp}  {e.get('service') or '-':<12} {text}"


def cmd_events(args: argparse.Namespace) -> int:
    """An environment's history besides its jobs; with -f, new events as they come."""
    after = 0
    while True:
        _, reply = call(args, "Events", pb.EventsRequest(environment=args.env, after=after), 10)
        for e in json.loads(reply.json):
            print(json.dumps(e) if args.json else event_line(e), flush=True)
            after = e["id"]
        if not args.follow:
            return EXIT_OK
        time.sleep(0.5)


def cmd_status(args: argparse.Namespace) -> int:
    rows = call_json(args, "Status", pb.EnvRef(environment=args.env), 60)
    if rows is None:
        return EXIT_OK
    table = []
    for r in rows:
        process = f"{r['process']}: {r['error']}" if r.get("error") else r["process"]  # e.g. out of memory
        data = [(f"{r[c + '_of']}:" if r.get(c + "_of") else "") + str(r[c]) if r.get(c) else "-"
                for c in ("mysql", "redis")]  # web:2: instance 2 of service web's
        if r.get("crash_loop"):
            process = "crash loop (deploy it again)"
        restarts = str(r.get("restarts", 0)) + (f", last {r['last_exit']}" if r.get("last_exit") else "")
        table.append([r["service"], str(r["code"] or "-"), *data, r["commit"][:10], r["host"], str(r["port"] or "-"),
                      process, r.get("health", "-"), restarts,
                      render.size(r["rss_bytes"]) if r.get("rss_bytes") else "-",
                      render.duration(r["cpu_s"]) if r.get("cpu_s") is not None else "-"])
        for rank, replica in enumerate(r.get("replicas", [])[1:], start=2):  # the same code instance elsewhere
            shown = f"{replica['process']}: {replica['error']}" if replica.get("error") else replica["process"]
            table.append([f"{r['service']}#{rank}", str(r["code"] or "-"), *data, r["commit"][:10], replica["host"],
                          str(replica["port"] or "-"), shown, replica.get("health", "-"), "",
                          render.size(replica["rss_bytes"]) if replica.get("rss_bytes") else "-",
                          render.duration(replica["cpu_s"]) if replica.get("cpu_s") is not None else "-"])
    sys.stdout.write(render.table(["SERVICE", "CODE", "MYSQL", "REDIS", "COMMIT", "HOST", "PORT", "PROCESS", "HEALTH", "RESTARTS",
                                   "RSS", "CPU"], table))
    limits = render.limits_table(rows)
    if limits:
        sys.stdout.write(f"\nlimits of {args.env} (per host, all its services there together)\n{limits}")
    return EXIT_OK if all(x["process"] == "running" for r in rows for x in [r, *r.get("replicas", [])[1:]]) \
        else EXIT_FAILED
