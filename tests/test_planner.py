"""The planner, table-driven: spec × ledger state × options → plan, with no I/O."""

from __future__ import annotations

import dataclasses

import pytest

from controller.state.ledger import LiveInstance, ServiceState
from controller.environments.planner import plan
from controller.environments.spec import Options, Service, Spec, code_fingerprint

WEB = Service("web", path="/", source="/repo", ref="main", start="node server.js", health="/",
              uses=("mysql", "redis"))
WORKER = Service("worker", source="/repo", ref="main", start="node worker.js", uses=("redis",))
SPEC = Spec(1, "shop", "prod", "shop.test", (WEB, WORKER))
C1, C2 = "1" * 40, "2" * 40


def live(service: Service, commit: str = C1, code: int | None = 1, mysql: int | None = 1,
         redis: int | None = 1) -> ServiceState:
    return ServiceState(
        service.name,
        code=LiveInstance(code, commit, code_fingerprint(service)) if code else None,
        mysql=LiveInstance(mysql) if mysql and "mysql" in service.uses else None,
        redis=LiveInstance(redis) if redis and "redis" in service.uses else None)


def summary(p) -> dict[str, dict[str, object]]:
    return {s.service: {c.component: ("new" if c.new else c.number) for c in s.changes} for s in p.services}


DEPLOYED = {"web": live(WEB), "worker": live(WORKER)}


@pytest.mark.parametrize("name, state, commits, options, expected", [
    ("first deploy", {}, {"web": C1, "worker": C1}, None,
     {"web": {"code": "new", "mysql": "new", "redis": "new"}, "worker": {"code": "new", "redis": "new"}}),
    ("unchanged: nothing to do", DEPLOYED, {"web": C1, "worker": C1}, None, {}),
    ("new commit: new code only", DEPLOYED, {"web": C2, "worker": C1}, None,
     {"web": {"code": "new", "mysql": 1, "redis": 1}}),
    ("renew mysql with a new commit", DEPLOYED, {"web": C2, "worker": C1},
     Options(services=("web",), renew={"web": ("mysql",)}),
     {"web": {"code": "new", "mysql": "new", "redis": 1}}),
    ("renew redis only: code kept", DEPLOYED, {"web": C1, "worker": C1}, Options(renew={"web": ("redis",)}),
     {"web": {"code": 1, "mysql": 1, "redis": "new"}}),
    ("limit to a service", {}, {"web": C1}, Options(services=("web",)),
     {"web": {"code": "new", "mysql": "new", "redis": "new"}}),
    ("after a destroy that kept data", {"web": live(WEB, code=None), "worker": live(WORKER)},
     {"web": C1, "worker": C1}, None, {"web": {"code": "new", "mysql": 1, "redis": 1}}),
])
def test_plans(name, state, commits, options, expected):
    assert summary(plan(SPEC, state, commits, options)) == expected


def test_changed_command_means_new_code_and_says_why():
    changed = dataclasses.replace(SPEC, services=(dataclasses.replace(WEB, start="node other.js"), WORKER))
    p = plan(changed, DEPLOYED, {"web": C1, "worker": C1})
    assert summary(p) == {"web": {"code": "new", "mysql": 1, "redis": 1}}
    assert p.services[0].reasons == ("commands, env or settings changed",)


def test_a_service_removed_from_the_spec_is_destroyed_only_with_prune():
    only_web = dataclasses.replace(SPEC, services=(WEB,))
    kept = plan(only_web, DEPLOYED, {"web": C1})
    assert kept.empty and "worker is no longer in the spec" in kept.notes[0]
    pruned = plan(only_web, DEPLOYED, {"web": C1}, prune=True)
    assert [(s.service, s.action) for s in pruned.services] == [("worker", "destroy")]


def test_a_pruned_service_whose_data_was_kept_is_not_planned_again():
    only_web = dataclasses.replace(SPEC, services=(WEB,))
    state = {"web": live(WEB), "worker": live(WORKER, code=None)}   # worker pruned, its redis kept
    assert plan(only_web, state, {"web": C1}, prune=True).empty
    assert plan(only_web, state, {"web": C1}).notes == ()
