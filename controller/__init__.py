"""The deployer's controller: desired state, the instantiation ledger, and the agents' work.

    fleet/         agents' links, the door, the CA, the registry, the dispatcher
    state/         the database, the vault, the ledger, jobs (the only code that speaks SQL)
    environments/  spec, planner, orders, a job's context, deploying, data, routing, teardown,
                   verify, recovery, command builders and fact readers
    daemon.py, operator_service.py   the process, and the operators' gRPC service on top

Imports go one way: environments → fleet → state → common (tests/test_layers.py).
"""

from common import __version__  # noqa: F401 - one version for every part
