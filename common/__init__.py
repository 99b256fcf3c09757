"""Code both sides use: the agent and the controller (and deployctl) import it; it imports
neither of them, only `protos` and third-party libraries (tests/test_layers.py). TLS identities
and enrolment tokens, the redaction of secrets, the `.env` format, `provides` settings, the
process set-up of a daemon, and the operator token's format."""

__version__ = "0.1.0"
