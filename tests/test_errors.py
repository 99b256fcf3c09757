"""One tree of errors (common/errors.py): every error class of the project is in it, each kind
maps once to its gRPC status and deployctl's exit code."""

from __future__ import annotations

import ast
import importlib

import grpc
import pytest

from common import errors
from tests.test_layers import PACKAGES, ROOT, module_name

OUTSIDE = {  # not errors of the deployer's, each for a reason
    "agent.launcher.LaunchError": "the published launcher runs with the standard library only",
    "agent.releases.Refused": "the release sealer runs as a script of the standard library only",
    "agent.executor._Symlink": "a signal inside one function, never raised out of it",
    "agent.session.SessionEnded": "the controller's goodbye: control flow, not a failure",
}


def error_classes() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
                continue
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ClassDef):
                    cls = getattr(importlib.import_module(module_name(path)), node.name)
                    if isinstance(cls, type) and issubclass(cls, BaseException):
                        found.append(f"{module_name(path)}.{node.name}")
    return sorted(found)


def test_every_error_of_the_project_is_in_the_tree():
    classes = error_classes()
    assert len(classes) > 20
    outside = []
    for name in classes:
        module, _, cls = name.rpartition(".")
        if not issubclass(getattr(importlib.import_module(module), cls), errors.DeployerError):
            outside.append(name)
    assert outside == sorted(OUTSIDE), outside


@pytest.mark.parametrize("kind, status, code", [
    (errors.BadInput, "INVALID_ARGUMENT", 2), (errors.NotFound, "NOT_FOUND", 2),
    (errors.Busy, "FAILED_PRECONDITION", 5), (errors.Refused, "PERMISSION_DENIED", 4),
    (errors.Unauthenticated, "UNAUTHENTICATED", 4), (errors.Unreachable, "UNAVAILABLE", 3),
    (errors.Failed, "ABORTED", 1), (errors.Broken, "INTERNAL", 1),
])
def test_each_kind_has_one_status_and_one_exit_code(kind, status, code):
    assert kind.status == status and grpc.StatusCode[status]
    assert errors.exit_code(status) == code


def test_the_precise_classes_sit_where_an_operator_expects():
    from controller.environments.spec import SpecError
    from controller.fleet.dispatcher import UnknownOperation
    from controller.state.jobs import Locked
    from common.credentials import CredentialRefused
    assert issubclass(SpecError, errors.BadInput) and issubclass(SpecError, ValueError)
    assert issubclass(Locked, errors.Busy)               # a held lock is "not now", not a bad argument
    assert issubclass(UnknownOperation, errors.NotFound) and issubclass(UnknownOperation, KeyError)
    assert CredentialRefused.status == "UNAUTHENTICATED"
