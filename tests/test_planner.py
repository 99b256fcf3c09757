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


# ---------------------------------------------------------------- instances shared between services

from controller.environments.spec import RedisSettings  # noqa: E402

QUEUE_WEB = dataclasses.replace(WEB, redis=RedisSettings("dedicated"))
QUEUE_WORKER = dataclasses.replace(WORKER, uses=("mysql", "redis"), shared=(("mysql", "web"), ("redis", "web")))
QUEUE = Spec(1, "shop", "prod", "shop.test", (QUEUE_WEB, QUEUE_WORKER))
BOTH = {"web": C1, "worker": C1}


def shared_summary(p) -> dict[str, dict[str, object]]:
    return {s.service: {c.component: (f"{c.owner}:" if c.owner else "") + ("new" if c.new or (c.owner and c.number
                                                                                            is None) else str(c.number))
                        for c in s.changes} for s in p.services}


def queue_state(mysql: int = 1, redis: int = 1, used: tuple[int, int] = (1, 1)) -> dict[str, ServiceState]:
    web = dataclasses.replace(live(QUEUE_WEB, mysql=mysql, redis=redis),
                              redis=LiveInstance(redis, mode="dedicated"))
    worker = ServiceState("worker", code=LiveInstance(1, C1, code_fingerprint(QUEUE_WORKER)),
                          used={"mysql": ("web", used[0]), "redis": ("web", used[1])})
    return {"web": web, "worker": worker}


def test_a_first_deploy_makes_the_shared_instances_once():
    p = plan(QUEUE, {}, BOTH)
    assert shared_summary(p) == {"web": {"code": "new", "mysql": "new", "redis": "new"},
                                 "worker": {"code": "new", "mysql": "web:new", "redis": "web:new"}}


def test_nothing_to_do_when_the_user_has_the_owners_live_instances():
    assert plan(QUEUE, queue_state(), BOTH).empty


def test_renewing_a_shared_instance_deploys_every_service_using_it():
    p = plan(QUEUE, queue_state(), BOTH, Options(services=("web",), renew={"web": ("mysql",)}))
    assert shared_summary(p) == {"web": {"code": "1", "mysql": "new", "redis": "1"},
                                 "worker": {"code": "1", "mysql": "web:new", "redis": "web:1"}}
    assert p.services[1].reasons == ("web's mysql is new",)
    assert p.notes == ("worker is deployed too: it uses web's mysql, which is new",)


def test_a_user_deployed_alone_brings_in_an_owner_that_has_no_instance_yet():
    p = plan(QUEUE, {}, BOTH, Options(services=("worker",)))
    assert [s.service for s in p.services] == ["web", "worker"]
    assert p.notes == ("web is deployed too: worker uses its mysql, which is not made yet",)


def test_a_user_behind_the_owners_live_instance_follows_it():
    # web's mysql was renewed while worker's deploy failed: worker still has the old one.
    p = plan(QUEUE, queue_state(mysql=2, used=(1, 1)), BOTH)
    assert shared_summary(p) == {"worker": {"code": "1", "mysql": "web:2", "redis": "web:1"}}
    assert p.services[0].reasons == ("now uses web's mysql 2",)


def test_a_new_redis_mode_is_a_new_instance():
    state = {"web": live(WEB), "worker": live(WORKER)}
    changed = dataclasses.replace(SPEC, services=(QUEUE_WEB, WORKER))
    p = plan(changed, state, BOTH)
    assert summary(p) == {"web": {"code": 1, "mysql": 1, "redis": "new"}}
    assert p.services[0].reasons == ("redis mode is now dedicated (live: prefix)",)


def test_owners_are_planned_before_users_at_any_depth():
    """alpha owns a database zed uses; zed owns the Redis mid uses: renewing zed's Redis brings mid
    in, and an order by depth puts alpha, then zed, then mid."""
    from controller.environments.spec import shared_depth
    alpha = dataclasses.replace(WORKER, name="alpha", uses=("mysql",))
    zed = dataclasses.replace(WORKER, name="zed", uses=("mysql", "redis"), shared=(("mysql", "alpha"),),
                              redis=RedisSettings("dedicated"))
    mid = dataclasses.replace(WORKER, name="mid", uses=("redis",), shared=(("redis", "zed"),))
    spec = Spec(1, "shop", "prod", "shop.test", (alpha, mid, zed))
    assert shared_depth(spec.services) == {"alpha": 0, "zed": 1, "mid": 2}
    state = {"alpha": live(alpha), "zed": dataclasses.replace(live(zed), used={"mysql": ("alpha", 1)},
                                                              redis=LiveInstance(1, mode="dedicated")),
             "mid": ServiceState("mid", code=LiveInstance(1, C1, code_fingerprint(mid)), used={"redis": ("zed", 1)})}
    p = plan(spec, state, {"alpha": C1, "zed": C1, "mid": C1}, Options(services=("zed",), renew={"zed": ("redis",)}))
    assert shared_summary(p) == {"mid": {"code": "1", "redis": "zed:new"},
                                 "zed": {"code": "1", "mysql": "alpha:1", "redis": "new"}}


def test_a_new_maxmemory_redeploys_the_owner_on_the_same_instance():
    state = queue_state()
    state["web"] = dataclasses.replace(state["web"], redis=LiveInstance(1, mode="dedicated", maxmemory=64 << 20))
    bigger = dataclasses.replace(QUEUE, services=(dataclasses.replace(QUEUE_WEB, redis=RedisSettings("dedicated",
                                                                                                 256 << 20)),
                                                  QUEUE_WORKER))
    p = plan(bigger, state, BOTH)
    assert shared_summary(p) == {"web": {"code": "1", "mysql": "1", "redis": "1"}}
    assert p.services[0].reasons == ("redis maxmemory is now 256M (live: 64M)",)
    assert plan(QUEUE, state, BOTH).empty  # the bound it has: nothing to do
