"""deployctl's command line: the options every command shares, and each subcommand with its
options, help text and example. One function adds each group of related subcommands; the commands
themselves are in the commands_* modules.
"""

from __future__ import annotations

import argparse

from common import __version__
from deployctl.commands_agents import (
    cmd_agents, cmd_agents_grant, cmd_agents_revoke, cmd_operator_token_create, cmd_operator_token_list,
    cmd_operator_token_revoke, cmd_token_create, cmd_token_list, cmd_token_revoke)
from deployctl.commands_deploy import (cmd_apply, cmd_backup, cmd_backups, cmd_check, cmd_plan, cmd_restore,
                                      cmd_rollback, cmd_secret_set)
from deployctl.commands_exec import cmd_exec, cmd_op_output, cmd_op_show
from deployctl.commands_inspect import cmd_events, cmd_job_show, cmd_jobs, cmd_ledger, cmd_logs, cmd_status


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
    # In the order `deployctl --help` lists them.
    for add in (add_agent_commands, add_token_commands, add_exec_commands, add_order_commands,
                add_job_commands, add_day2_commands, add_operator_token_commands, add_secret_commands):
        add(sub)
    return parser


def add_agent_commands(sub) -> None:
    """`agents`, and `agents grant`, `ungrant` and `revoke`."""
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
                          epilog="example: deployctl agents grant db-1 --provides mysql,redis --address 10.0.0.7\n"
                                 "         deployctl agents grant web-2 --capacity memory=16G,cpu=8 --label zone=eu-1")
    r.add_argument("agent_id")
    r.add_argument("--provides", action="append", help="mysql, redis, nginx (comma-separated, repeatable)")
    r.add_argument("--address", help="IP address or host name other hosts use to reach its services")
    r.add_argument("--capacity", help="what placement may count on it: memory=SIZE,cpu=N (never more than "
                                      "it measures; by default what it measures)")
    r.add_argument("--label", action="append", help="KEY=VALUE a spec's host_labels can pin to (repeatable)")
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
    r.add_argument("--capacity", action="store_true", help="forget the granted capacity (count what it measures)")
    r.add_argument("--label", action="append", help="KEY of a label to take away (repeatable)")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(func=cmd_agents_grant)


def add_token_commands(sub) -> None:
    """`token`: enrolment tokens for new agents."""
    token = sub.add_parser("token", help="enrolment tokens for new agents").add_subparsers(
        dest="token_command", metavar="SUBCOMMAND")
    p = token.add_parser("create", help="a single-use, expiring enrolment token",
                         description="Make a token that enrols one agent: `DEPLOYER_TOKEN=T deployer-agent "
                                     "enroll` (or in its environment on its first start). An open token "
                                     "cannot take an id that is enrolled; one made with --agent replaces "
                                     "that agent's certificates. It is printed once and only its "
                                     "hash is kept.",
                         epilog="example: deployctl token create --role computing --provides nginx --ttl 1h")
    p.add_argument("--role", action="append", required=True, help="computing, daemons or routing (repeatable)")
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


def add_exec_commands(sub) -> None:
    """`exec` across the fleet, and `op` to look at one operation."""
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


def add_order_commands(sub) -> None:
    """`plan` and `apply` an order."""
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


def add_job_commands(sub) -> None:
    """What happened and what runs: `jobs`, `job`, `logs`, `ledger`, `status`."""
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
                                   "deployctl logs APP/ENV/SERVICE: the service's own output from its agent, every code "
                                   "instance's in time order (the last 20 lines unless --since or --tail); "
                                   "with -f it keeps following, across restarts and redeploys.",
                       epilog="examples: deployctl logs job-20261125T101500-a1b2c3 | deployctl logs shop/prod/web -f | "
                              "deployctl logs shop/prod/web --instance 4 | deployctl logs shop/prod/web --since 10m -t")
    p.add_argument("job_id", metavar="JOB | APP/ENV/SERVICE")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--tail", type=int, help="service logs: lines of the past to show first (default 20)")
    p.add_argument("--instance", type=int, metavar="N",
                   help="service logs: code instance N's output, live or not (one that failed, say)")
    p.add_argument("--since", metavar="WHEN",
                   help="service logs: lines from this moment on: a time ago (10m, 2h, 1d) or a UTC time (2026-12-02T22:40)")
    p.add_argument("--until", metavar="WHEN", help="service logs: lines before this moment (same forms)")
    p.add_argument("-t", "--timestamps", action="store_true",
                   help="service logs: each line with its time (UTC) and code instance")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("ledger", help="which instance of each component every deploy made or reused",
                       epilog="example: deployctl ledger shop/prod api")
    p.add_argument("env", help="APP/ENVIRONMENT")
    p.add_argument("service", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser("events", help="an environment's history besides its jobs: processes that ended, "
                                      "restarts the controller ordered, crash loops, lost agents",
                       epilog="example: deployctl events shop/prod -f")
    p.add_argument("env", help="APP/ENVIRONMENT")
    p.add_argument("-f", "--follow", action="store_true", help="then print new events as they come")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("status", help="live instance, host, port, health, RSS and CPU of each service, "
                                      "and the environment's use of its limits",
                       epilog="example: deployctl status shop/prod")
    p.add_argument("env", help="APP/ENVIRONMENT")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)


def add_day2_commands(sub) -> None:
    """Day 2: `rollback`, `reload`, `verify`, `repair`, `clean`, `destroy`."""
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

    p = sub.add_parser("backup", help="a snapshot of a service's MySQL database now",
                       description="Dump the service's live MySQL instance (one transaction, compressed) into its "
                                   "root-only folder on the data host; the newest 5 are kept. One is also taken "
                                   "before every migrate that runs against a live database.",
                       epilog="example: deployctl backup shop/prod/web")
    p.add_argument("target", metavar="APP/ENV/SERVICE")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("backups", help="a service's MySQL snapshots, with size and age",
                       epilog="example: deployctl backups shop/prod/web")
    p.add_argument("target", metavar="APP/ENV/SERVICE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_backups)

    p = sub.add_parser("restore", help="a new MySQL instance from a snapshot, and every service using it switched to it",
                       description="Make a new MySQL instance (the next number) from a snapshot of the service's "
                                   "live one and switch every service using that instance to it, blue/green; the "
                                   "replaced instance is kept. Writes made after the snapshot are not in it.",
                       epilog="example: deployctl restore shop/prod/web --from 20261202T193000Z --yes")
    p.add_argument("target", metavar="APP/ENV/SERVICE")
    p.add_argument("--from", dest="snapshot", required=True, metavar="ID", help="a snapshot ID (deployctl backups)")
    p.add_argument("--yes", action="store_true", help="do not ask (writes made after the snapshot are left behind)")
    p.set_defaults(func=cmd_restore)

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

    p = sub.add_parser("certificate", help="tls: auto: order a new certificate now, and switch it in on every router",
                       description="For an environment with tls: auto, order a certificate for its names from "
                                   "the controller's ACME server now (HTTP-01, answered by the routers) and "
                                   "switch it in on every router with an nginx reload, which drops no request. "
                                   "The controller renews on its own when less than acme.renew_before (30 "
                                   "days) is left; this is for the times it should not wait.",
                       epilog="example: deployctl certificate shop/prod")
    p.add_argument("env", help="APP/ENVIRONMENT")
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


def add_operator_token_commands(sub) -> None:
    """`operator-token`: credentials for deployctl over TCP."""
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


def add_secret_commands(sub) -> None:
    """`secret set`."""
    secret = sub.add_parser("secret", help="set secret values").add_subparsers(dest="secret_command", metavar="SUBCOMMAND")
    p = secret.add_parser("set", help="set a secret from standard input",
                          epilog="example: printf %%s \"$KEY\" | deployctl secret set shop/prod SESSION_KEY")
    p.add_argument("env", help="APP/ENVIRONMENT")
    p.add_argument("name")
    p.set_defaults(func=cmd_secret_set)
