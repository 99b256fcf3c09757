"""How every command reaches the controller: the target (its Unix socket, or TCP with an operator
token), one unary call, and a gRPC error turned into one line with the exit code to leave with
(CliError). Also the APP/ENV/SERVICE argument, read the same way by the commands that take it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import grpc

from protos import deployer_pb2_grpc as pb_grpc

from common import errors
from common.errors import EXIT_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE
from deployctl import channel as operator_channel

RETRYABLE = {grpc.StatusCode.UNAVAILABLE}


class CliError(errors.DeployerError):
    """A one-line error for the operator, with the exit code to leave with."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


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
        raise (order_error if order else rpc_error)(exc, where) from None


def call_json(args: argparse.Namespace, method: str, request, timeout: float):
    """A call whose reply carries JSON: the data, or None once `--json` has printed it as is."""
    _, reply = call(args, method, request, timeout)
    data = json.loads(reply.json)
    if args.json:
        print(json.dumps(data, indent=2))
        return None
    return data


def rpc_error(exc: grpc.RpcError, where: str) -> CliError:
    if exc.code() in RETRYABLE:
        return CliError(f"cannot reach the controller at {where}: {exc.details()}", EXIT_UNREACHABLE)
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        return CliError(f"the controller refused the credential ({exc.details()})", EXIT_REFUSED)
    if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
        return CliError(f"not permitted: {exc.details()}", EXIT_REFUSED)
    return CliError(exc.details() or exc.code().name, errors.exit_code(exc.code().name))


def order_error(exc: grpc.RpcError, where: str) -> CliError:
    error = rpc_error(exc, where)
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        error.code = EXIT_FAILED
    return error


def env_service(value: str) -> tuple[str, str]:
    parts = value.split("/")
    if len(parts) != 3 or not all(parts):
        raise CliError(f"{value!r}: expected APP/ENVIRONMENT/SERVICE, e.g. shop/prod/web", EXIT_USAGE)
    return "/".join(parts[:2]), parts[2]
