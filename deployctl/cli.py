"""deployctl: the operator's command line. It talks to the controller over its Unix socket, or
over TCP (TLS) with an operator token.

Exit codes: 0 success; 1 an operation or agent failed; 2 bad usage or input; 3 the controller
cannot be reached; 4 the controller refused the credential (none, unknown, revoked, expired, or
a role that does not cover the command); 130 interrupted (Ctrl-C; the operations were cancelled).
"""

from __future__ import annotations

import sys

from common.system import tune_malloc
from common.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from deployctl.client import CliError
from deployctl.commands_deploy import follow_job
from deployctl.commands_exec import describe
from deployctl.parser import build_parser

# Named here as well, for the tests and scripts that take them from deployctl.cli.
__all__ = ["CliError", "EXIT_OK", "build_parser", "describe", "follow_job", "main"]


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
