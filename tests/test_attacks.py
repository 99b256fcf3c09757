"""Attacks on a shared server, replayed for real: each test plays a hostile tenant, a rogue agent
or a local user, and asserts that the concrete harm did not happen (not merely that an error was
printed). Where it can be shown safely, a test also shows the attack works without its defence.

Sections are independent (each builds what it needs); see docs/decisions/013-threat-model.md.
"""

from __future__ import annotations


# ---------------------------------------------------------------- 1. ownership before destruction


# ---------------------------------------------------------------- 2. tenant code without root


# ---------------------------------------------------------------- 3. agents prove what they provide


# ---------------------------------------------------------------- 4. operators authenticate


# ---------------------------------------------------------------- 5. limits per environment


# ---------------------------------------------------------------- 6. shared Redis stays available


# ---------------------------------------------------------------- 7. acknowledged output is kept


# ---------------------------------------------------------------- 8. least knowledge


# ---------------------------------------------------------------- 9. one owner per port
