"""Every error the deployer raises on purpose, in one tree. `str()` of each is one line naming what
and where, safe to show to whoever asked. Each kind says once how it leaves the controller (its
gRPC status) and how deployctl ends (its exit code):

    DeployerError
    ├── BadInput        INVALID_ARGUMENT     exit 2   the request or a file is wrong
    │   ├── SpecError       (controller/environments/spec.py: file, line, key)
    │   ├── SourceError     (a git source or ref that cannot be resolved)
    │   ├── OrderError      (an order that cannot be carried out as given)
    │   ├── RouteValueError (a value that cannot go into an nginx file)
    │   └── ConfigError     (agent/config.py)
    ├── NotFound        NOT_FOUND            exit 2   no such job, operation, agent or environment
    │   └── UnknownOperation
    ├── Busy            FAILED_PRECONDITION  exit 5   not now: another job holds the environment
    │   └── Locked          (controller/state/jobs.py)
    ├── Refused         PERMISSION_DENIED    exit 4   the caller may not
    │   ├── CredentialRefused   UNAUTHENTICATED (no usable operator token)
    │   ├── NotPermitted        (a role that does not cover the method)
    │   └── EnrolmentRefused    (a token that is spent, expired, or for another agent)
    ├── Unreachable     UNAVAILABLE          exit 3   the controller or an agent cannot be reached
    ├── Failed          ABORTED              exit 1   the work was tried and failed
    │   ├── StepFailed, PlacementError (a deploy's step; no agent can take it)
    │   └── StartError, LaunchError, LimitError, Refused (an agent's command could not run)
    └── Broken          INTERNAL             exit 1   the deployer's own state or set-up is at fault
        └── TlsError, VaultError, PkiError, JournalError, StartupError, ProtocolError, …

Code raises the most precise class; the controller's operator service maps any DeployerError by
its kind (`status`), and deployctl maps a status back to an exit code (`EXIT_CODES`), so a new
error needs neither place changed.
"""

from __future__ import annotations

# deployctl's exit codes (README: "Exit codes")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_REFUSED, EXIT_BUSY = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130


class DeployerError(Exception):
    """The root: an error the deployer raised on purpose (anything else is a bug)."""

    status = "INTERNAL"


class BadInput(DeployerError, ValueError):
    status = "INVALID_ARGUMENT"


class NotFound(DeployerError):
    status = "NOT_FOUND"


class Busy(DeployerError):
    status = "FAILED_PRECONDITION"


class Refused(DeployerError):
    status = "PERMISSION_DENIED"


class Unauthenticated(Refused):
    status = "UNAUTHENTICATED"


class Unreachable(DeployerError):
    status = "UNAVAILABLE"


class Failed(DeployerError):
    status = "ABORTED"


class Broken(DeployerError):
    status = "INTERNAL"


# A gRPC status (by name) → deployctl's exit code. Statuses not named here end with EXIT_FAILED.
EXIT_CODES = {
    "OK": EXIT_OK,
    "INVALID_ARGUMENT": EXIT_USAGE, "NOT_FOUND": EXIT_USAGE,
    "FAILED_PRECONDITION": EXIT_BUSY,
    "UNAUTHENTICATED": EXIT_REFUSED, "PERMISSION_DENIED": EXIT_REFUSED,
    "UNAVAILABLE": EXIT_UNREACHABLE,
}


def exit_code(status_name: str) -> int:
    return EXIT_CODES.get(status_name, EXIT_FAILED)
