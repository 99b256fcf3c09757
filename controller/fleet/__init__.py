"""The fleet: agents' links and what travels on them. The gateway and enrolment services, the
door every call passes (mutual TLS, operator tokens), the CA, the registry of agents, the
dispatcher of operations and their output logs. It knows nothing of environments."""
