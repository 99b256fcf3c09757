"""The deployer's agent: dials the controller and runs only the operations it is given."""

import os

# The agent starts commands as other users (`Popen(user=...)`), which makes CPython fork() rather
# than vfork(); gRPC's fork handlers then run in the child and can crash it before exec. The
# children never use gRPC, so the handlers are not needed. Must be set before grpc is imported,
# hence here: `python -m agent.main` runs this first. The controller starts no process as another
# user, and does not import the agent.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from common import __version__  # noqa: E402,F401 - one version for every part
