"""The deployer's agent: dials the controller and runs only the operations it is given."""

import os

# The agent starts commands as other users (`Popen(user=...)`), which makes CPython fork() rather
# than vfork(); gRPC's fork handlers then run in the child and can crash it before exec. The
# children never use gRPC, so the handlers are not needed. Must be set before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

__version__ = "0.1.0"
