"""Environments: the spec and its names, sources, the planner, orders and jobs, and what a job
does to an environment — each a module of its own taking the job's context (context.py):
deploying (deploy, go-live, undo), data (MySQL and Redis instances), routing (the nginx file),
teardown (remove a service, destroy), verify/repair/clean, crash recovery — and the command
builders and fact readers they compose. Built on the fleet (to run operations) and the state (to
record them)."""
