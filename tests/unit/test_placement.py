from rustic_ai.k8s.base.models import HostRecord, HostState, LaunchRequest
from rustic_ai.k8s.placement import LeastLoaded, RoundRobin, StaticDiscovery, merge_with_registry

REQ = LaunchRequest(guild_spec={"id": "g"}, agent_spec={"id": "a"}, messaging_config={})


def hosts(*specs):
    return [HostRecord(addr, capacity=cap, agents=n, state=state) for addr, cap, n, state in specs]


def test_round_robin_rotates_over_ready_hosts_only():
    hs = hosts(("a:1", 10, 0, HostState.SERVING), ("b:1", 10, 0, HostState.SERVING),
               ("c:1", 10, 0, HostState.DRAINING), ("d:1", 1, 1, HostState.SERVING))
    rr = RoundRobin()
    firsts = [rr.order(hs, REQ)[0].address for _ in range(4)]
    assert firsts == ["a:1", "b:1", "a:1", "b:1"]
    assert {h.address for h in rr.order(hs, REQ)} == {"a:1", "b:1"}


def test_least_loaded_prefers_relative_load_and_shares_ties():
    hs = hosts(("a:1", 10, 5, HostState.SERVING), ("b:1", 100, 10, HostState.SERVING),
               ("c:1", 10, 5, HostState.SERVING))
    ll = LeastLoaded()
    assert ll.order(hs, REQ)[0].address == "b:1"
    tie = hosts(("a:1", 10, 0, HostState.SERVING), ("b:1", 10, 0, HostState.SERVING))
    assert {ll.order(tie, REQ)[0].address for _ in range(4)} == {"a:1", "b:1"}


def test_no_candidates_when_every_host_is_full_or_draining():
    hs = hosts(("a:1", 1, 1, HostState.SERVING), ("b:1", 5, 0, HostState.DRAINING))
    assert RoundRobin().order(hs, REQ) == [] and LeastLoaded().order(hs, REQ) == []


async def test_static_hosts_take_load_and_state_from_the_registry():
    found = await StaticDiscovery(["b:1", "a:1", "a:1"]).hosts()
    assert [h.address for h in found] == ["a:1", "b:1"]
    merged = merge_with_registry(found, hosts(("a:1", 4, 3, HostState.DRAINING)))
    assert merged[0].state == HostState.DRAINING and merged[1].accepts_agents
