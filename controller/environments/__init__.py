"""Environments: the spec and its names, sources, the planner, orders and jobs, the deploy
procedures and routing, verify/repair/clean/destroy, crash recovery, and the command builders
sent to agents. Built on the fleet (to run operations) and the state (to record them)."""
