"""Placement (controller/environments/placement.py): pure, so each rule is one case here; the
fleet tests (test_fleet.py) place across namespaced hosts."""

from __future__ import annotations

import dataclasses

import pytest

from controller.environments.placement import Host, PlacementError, Want, capacity, place, place_replicas, room

G = 1 << 30


def host(id, roles=("computing",), **kw) -> Host:
    return Host(id, tuple(roles), **kw)


def want(env="shop/prod", **kw) -> Want:
    return Want(env, kw.pop("service", "web"), kw.pop("role", "computing"), kw.pop("memory", G), kw.pop("cpu", 1.0),
                **kw)


def test_the_host_with_the_most_room_takes_it_and_says_why():
    fleet = [host("c-1", memory=8 * G, cpu=4, reserved_memory=6 * G, reserved_cpu=1, instances=3),
             host("c-2", memory=8 * G, cpu=4, reserved_memory=2 * G, reserved_cpu=1, instances=5),
             host("d-1", roles=("daemons",), memory=64 * G, cpu=32)]
    choice = place(fleet, want())
    assert choice.host == "c-2"
    # memory is the scarcer: (8 - 2 - 1) / 8 = 62%, CPU (4 - 1 - 1) / 4 = 50% → 50%
    assert choice.why == "most room of 2 agents of role computing (50% left after it, 5 instances there)"


def test_the_scarcer_resource_decides_and_ties_go_to_fewer_instances_then_the_id():
    cpu_bound = host("c-1", memory=64 * G, cpu=2, reserved_cpu=1.5)
    memory_bound = host("c-2", memory=4 * G, cpu=64, reserved_memory=2 * G)
    assert room(cpu_bound, want()) == pytest.approx(-0.25)
    assert place([cpu_bound, memory_bound], want()).host == "c-2"
    same = dict(memory=8 * G, cpu=4)
    assert place([host("c-2", instances=1, **same), host("c-1", instances=2, **same)], want()).host == "c-2"
    assert place([host("c-2", **same), host("c-1", **same)], want()).host == "c-1"


def test_an_environment_reserves_once_per_host_whatever_its_services():
    # Its limits bound all its services on one host together: a second service there costs nothing.
    there = host("c-1", memory=4 * G, cpu=4, reserved_memory=3 * G, reserved_cpu=1, environments=frozenset({"shop/prod"}))
    empty = host("c-2", memory=4 * G, cpu=4, instances=0)
    assert room(there, want()) == pytest.approx(0.25)
    assert room(there, want(env="blog/prod")) == pytest.approx(0.0)
    assert room(empty, want()) == pytest.approx(0.75)


def test_capacity_is_granted_but_never_above_what_the_host_measures():
    assert capacity(64 * G, 32, 24 * G, 2) == (24 * G, 2.0)   # granted more than it has: what it has
    assert capacity(8 * G, 1.5, 24 * G, 2) == (8 * G, 1.5)    # granted less: the grant
    assert capacity(0, 0, 24 * G, 2) == (24 * G, 2.0)         # nothing granted: what it measures
    assert capacity(0, 0, 0, 0) == (0, 0.0)                   # not known: placement counts instances


def test_twenty_environments_placed_one_after_another_spread_evenly():
    fleet = {h: host(h, memory=24 * G, cpu=2) for h in ("c-1", "c-2")}
    for n in range(20):
        w = want(env=f"app/e{n}", memory=512 << 20, cpu=0.1)
        chosen = place(list(fleet.values()), w).host
        h = fleet[chosen]
        fleet[chosen] = dataclasses.replace(h, reserved_memory=h.reserved_memory + w.memory,
                                            reserved_cpu=h.reserved_cpu + w.cpu, instances=h.instances + 1,
                                            environments=h.environments | {w.env_key})
    assert [fleet["c-1"].instances, fleet["c-2"].instances] == [10, 10]


def test_a_pin_to_a_host_or_labels():
    fleet = [host("c-1", labels={"zone": "a"}), host("c-2", labels={"zone": "b", "disk": "ssd"}),
             host("d-1", roles=("daemons",))]
    assert place(fleet, want(host="c-1")).host == "c-1"
    assert place(fleet, want(host="c-1")).why.startswith("pinned: host c-1")
    assert place(fleet, want(labels={"zone": "b"})).host == "c-2"
    with pytest.raises(PlacementError, match=r"^web: host c-9 is not an agent of this controller "
                                             r"\(agents of role computing: c-1, c-2\)$"):
        place(fleet, want(host="c-9"))
    with pytest.raises(PlacementError, match=r"^web: host d-1 does not have role computing \(its roles: daemons\)$"):
        place(fleet, want(host="d-1"))
    with pytest.raises(PlacementError, match=r"^web: no agent of role computing has labels zone=c \(labels granted: "
                                             r"disk=ssd,zone=b; zone=a; deployctl agents grant ID --label KEY=VALUE\)$"):
        place(fleet, want(labels={"zone": "c"}))


def test_a_live_instance_stays_unless_its_host_is_lost_or_no_longer_fits():
    fleet = [host("c-1", instances=9), host("c-2")]
    assert place(fleet, want(stay_on="c-1")) == place(fleet, want(stay_on="c-1"))
    assert place(fleet, want(stay_on="c-1")).host == "c-1"
    assert place(fleet, want(stay_on="c-1")).why == "stays on the host of its live instance"
    away = [host("c-1", state="disconnected"), host("c-2")]
    with pytest.raises(PlacementError, match=r"^web: agent c-1 \(which runs this service\) is disconnected; "
                                             r"it moves only once that host is lost$"):
        place(away, want(stay_on="c-1"))
    lost = [host("c-1", state="lost"), host("c-2")]
    assert place(lost, want(stay_on="c-1")).host == "c-2"
    assert place(lost, want(stay_on="c-1")).why.startswith("its host c-1 is lost; the only connected agent")
    moved = place(fleet, want(stay_on="c-1", host="c-2"))
    assert (moved.host, moved.why.split(";")[0]) == ("c-2", "its host c-1 no longer fits the spec")


def test_no_connected_agent_of_the_role_is_one_line_naming_each():
    fleet = [host("c-1", state="lost"), host("c-2", state="disconnected")]
    with pytest.raises(PlacementError, match=r"^web: no connected agent of role computing "
                                             r"\(c-1 lost, c-2 disconnected\)$"):
        place(fleet, want())
    with pytest.raises(PlacementError, match=r"^web: no connected agent of role computing$"):
        place([], want())


def test_a_full_fleet_still_places_and_says_it_is_over_committed():
    fleet = [host("c-1", memory=2 * G, cpu=1, reserved_memory=2 * G, reserved_cpu=1),
             host("c-2", memory=2 * G, cpu=1, reserved_memory=3 * G, reserved_cpu=1)]
    choice = place(fleet, want())
    assert choice.host == "c-1"
    assert "over-committed by 100%: every eligible host is full" in choice.why  # CPU: (1 - 1 - 1) / 1


def test_replicas_go_to_different_hosts_by_room_and_stay_where_their_live_ones_run():
    fleet = [host("c-1", memory=8 * G, cpu=4, reserved_memory=4 * G), host("c-2", memory=8 * G, cpu=4),
             host("c-3", memory=8 * G, cpu=4, reserved_memory=2 * G), host("r-1", roles=("routing",))]
    chosen, warning = place_replicas(fleet, want(), 2)
    assert [c.host for c in chosen] == ["c-2", "c-3"] and warning == ""
    assert chosen[0].why.startswith("most room of 3 agents of role computing (")
    assert chosen[1].why == "replica 2: most room of the hosts without a replica of it"
    kept, _ = place_replicas(fleet, want(), 3, live=("c-3", "c-1"))
    assert [c.host for c in kept] == ["c-3", "c-1", "c-2"]
    assert kept[0].why == "stays on the host of its live instance" and kept[1].why == "replica 2 stays on the host of its live replica"


def test_more_replicas_than_hosts_share_them_and_say_so_and_a_lost_hosts_replica_moves():
    fleet = [host("c-1"), host("c-2", state="lost")]
    chosen, warning = place_replicas(fleet, want(), 3)
    assert [c.host for c in chosen] == ["c-1", "c-1", "c-1"]
    assert warning == "web: replicas: 3, but 1 connected agent of role computing: 2 replicas share a host"
    assert chosen[2].why == "replica 3: shares c-1 with another replica"
    two = [host("c-1"), host("c-2", state="lost"), host("c-3")]
    moved, warning = place_replicas(two, want(), 2, live=("c-1", "c-2"))
    assert [c.host for c in moved] == ["c-1", "c-3"] and warning == ""
    first_lost, _ = place_replicas(two, want(), 2, live=("c-2", "c-1"))
    assert first_lost[0].host == "c-3" and first_lost[0].why.startswith("its host c-2 is lost; ")
    assert [c.host for c in first_lost] == ["c-3", "c-1"]
