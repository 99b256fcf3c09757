"""The deployer's agent: dials the controller and runs only the operations it is given."""

__version__ = "0.1.0"
