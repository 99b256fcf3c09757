"""The deployer's controller: desired state, the instantiation ledger, and the agents' work."""

__version__ = "0.1.0"
