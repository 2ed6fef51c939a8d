"""Kubernetes discovery against a fake API server that speaks the real list/watch protocol.

The client library is not patched: KubernetesDiscovery reads a real kubeconfig file that
points kubernetes_asyncio at tests/support/fake_kube_api.py over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from rustic_ai.k8s import AsyncK8sEngine, ConfigError, EngineSettings
from rustic_ai.k8s.placement.factory import discovery_from_settings
from rustic_ai.k8s.placement.kubernetes import KubernetesDiscovery
from support.eventually import eventually
from support.fleet import answers
from support.fake_kube_api import TOKEN, Endpoint, FakeKubeApi
from support.probe import guild_spec, responder

SERVICE = "rustic-agent-host"


@pytest.fixture
async def api():
    async with FakeKubeApi() as fake:
        yield fake


@pytest.fixture
def kubeconfig(api, tmp_path) -> str:
    return str(api.write_kubeconfig(tmp_path / "kubeconfig"))


@pytest.fixture
async def discovery_factory(kubeconfig):
    """Builds started KubernetesDiscovery instances with fast retries; closes them after."""
    made: list[KubernetesDiscovery] = []

    async def make(**kw) -> KubernetesDiscovery:
        options = {"namespace": "default", "service": SERVICE, "kubeconfig": kubeconfig,
                   "backoff_initial_s": 0.05, "backoff_max_s": 0.3, "start_timeout_s": 5.0}
        options.update(kw)
        d = KubernetesDiscovery(**options)
        made.append(d)
        await d.start()
        return d

    yield make
    for d in made:
        await d.close()


async def addresses(d: KubernetesDiscovery) -> set[str]:
    return {h.address for h in await d.hosts()}


def until(d: KubernetesDiscovery, expected: set[str]):
    async def check():
        return await addresses(d) == expected

    return check


async def test_pods_added_become_hosts_and_slices_are_merged(api, discovery_factory):
    api.put_slice("hosts-a", SERVICE, [Endpoint("10.0.0.1", pod="host-0"), Endpoint("10.0.0.2", pod="host-1")])
    d = await discovery_factory()
    # start() waited for the first list: the first placement already sees the hosts.
    assert await addresses(d) == {"10.0.0.1:50051", "10.0.0.2:50051"}
    assert {h.name for h in await d.hosts()} == {"host-0", "host-1"}
    api.set_endpoints("hosts-a", [Endpoint("10.0.0.1"), Endpoint("10.0.0.2"), Endpoint("10.0.0.3")])
    # A second slice of the same Service (large Services are split), here IPv6.
    api.put_slice("hosts-b", SERVICE, [Endpoint("fd00::7")], address_type="IPv6")
    await eventually(until(d, {"10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051", "[fd00::7]:50051"}),
                     timeout=5, what="added pods listed")


async def test_only_the_service_in_the_namespace_and_its_named_port_count(api, discovery_factory):
    api.put_slice("mine", SERVICE, [Endpoint("10.0.0.1")])
    api.put_slice("other-service", "redis", [Endpoint("10.0.9.9")])
    api.put_slice("other-namespace", SERVICE, [Endpoint("10.0.8.8")], namespace="elsewhere")
    api.put_slice("unnamed-port", SERVICE, [Endpoint("10.0.7.7")], port_name="metrics", port=9090)
    api.put_slice("custom-port", SERVICE, [Endpoint("10.0.0.2")], port=7000)
    d = await discovery_factory()
    assert await addresses(d) == {"10.0.0.1:50051", "10.0.0.2:7000"}
    listed = [q for kind, q in api.requests if kind == "list"]
    assert listed[0]["labelSelector"] == f"kubernetes.io/service-name={SERVICE}"


async def test_a_pod_becoming_not_ready_disappears(api, discovery_factory):
    api.put_slice("s", SERVICE, [Endpoint("10.0.0.1"), Endpoint("10.0.0.2"), Endpoint("10.0.0.3", ready=None)])
    d = await discovery_factory()
    # No ready condition at all means ready, as the EndpointSlice API documents.
    assert await addresses(d) == {"10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"}
    api.set_endpoints("s", [Endpoint("10.0.0.1"), Endpoint("10.0.0.2", ready=False), Endpoint("10.0.0.3", ready=None)])
    await eventually(until(d, {"10.0.0.1:50051", "10.0.0.3:50051"}), timeout=5, what="not-ready pod dropped")
    api.set_endpoints("s", [Endpoint("10.0.0.1"), Endpoint("10.0.0.2", ready=True), Endpoint("10.0.0.3", ready=None)])
    await eventually(until(d, {"10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"}), timeout=5,
                     what="ready again")


async def test_a_deleted_pod_and_a_deleted_slice_disappear(api, discovery_factory):
    api.put_slice("a", SERVICE, [Endpoint("10.0.0.1"), Endpoint("10.0.0.2")])
    api.put_slice("b", SERVICE, [Endpoint("10.0.1.1")])
    d = await discovery_factory()
    assert len(await d.hosts()) == 3
    api.set_endpoints("a", [Endpoint("10.0.0.1")])
    await eventually(until(d, {"10.0.0.1:50051", "10.0.1.1:50051"}), timeout=5, what="deleted pod dropped")
    api.delete_slice("b")
    await eventually(until(d, {"10.0.0.1:50051"}), timeout=5, what="deleted slice dropped")


@pytest.mark.parametrize("how", ["error-event", "http-410"])
async def test_an_expired_watch_lists_again_and_continues(api, discovery_factory, how):
    api.put_slice("s", SERVICE, [Endpoint("10.0.0.1")])
    d = await discovery_factory()
    await eventually(lambda: api.open_watches == 1, timeout=5, what="watch open")
    assert d.lists == 1
    if how == "error-event":
        # The watch is told its version was compacted away: an ERROR event with a 410 Status.
        api.expire_watches()
    else:
        # The connection drops; the resumed watch asks for a compacted version and gets HTTP 410.
        api.gone_as_http = True
        api.compact()
        api.drop_watches()
    await eventually(lambda: d.lists == 2, timeout=5, what="re-list after 410")
    # A change made while no watch was open is in the new list, later ones come by watch.
    api.set_endpoints("s", [Endpoint("10.0.0.1"), Endpoint("10.0.0.2")])
    await eventually(until(d, {"10.0.0.1:50051", "10.0.0.2:50051"}), timeout=5, what="watch continued")
    assert d.lists == 2


async def test_a_server_that_keeps_answering_410_is_retried_with_backoff(api, discovery_factory):
    api.put_slice("s", SERVICE, [Endpoint("10.0.0.1")])
    d = await discovery_factory(backoff_initial_s=0.05, backoff_max_s=0.4)
    await eventually(lambda: api.open_watches == 1, timeout=5, what="watch open")
    api.gone_as_http = True
    api.oldest_version = 10**9  # every watch is "too old", even right after a list
    t0 = time.monotonic()
    api.drop_watches()
    await eventually(lambda: d.lists >= 5, timeout=10, what="repeated re-lists")
    # The first 410 re-lists at once; the next ones wait 0.025-0.05, 0.05-0.1, 0.1-0.2 s.
    assert time.monotonic() - t0 >= 0.175
    assert await addresses(d) == {"10.0.0.1:50051"}


async def test_an_api_outage_keeps_the_last_hosts_and_recovers(api, discovery_factory):
    api.put_slice("s", SERVICE, [Endpoint("10.0.0.1"), Endpoint("10.0.0.2")])
    d = await discovery_factory()
    before = await addresses(d)
    await eventually(lambda: api.open_watches == 1, timeout=5, what="watch open")
    seen = len(api.requests)
    api.start_outage()  # open watch cut, every request now answered 500
    await eventually(lambda: len(api.requests) >= seen + 3, timeout=5, what="retries during the outage")
    assert await addresses(d) == before  # the last known hosts, not an empty fleet
    api.set_endpoints("s", [Endpoint("10.0.0.2"), Endpoint("10.0.0.3")])  # changed while unreachable
    assert await addresses(d) == before
    api.end_outage()
    await eventually(until(d, {"10.0.0.2:50051", "10.0.0.3:50051"}), timeout=5, what="recovered after the outage")
    # It resumed from the last version it had seen (history kept), not a fresh list.
    assert d.lists == 1


async def test_retries_back_off_during_an_outage(api, discovery_factory):
    api.put_slice("s", SERVICE, [Endpoint("10.0.0.1")])
    d = await discovery_factory(backoff_initial_s=0.05, backoff_max_s=0.4)
    await eventually(lambda: api.open_watches == 1, timeout=5, what="watch open")
    api.start_outage()
    seen = len(api.requests)
    t0 = time.monotonic()
    await eventually(lambda: len(api.requests) >= seen + 6, timeout=10, what="six retries")
    # Delays double from 0.05 s to the 0.4 s cap with equal jitter: six retries take at
    # least 0.025+0.05+0.1+0.2+0.2 s, so they do not hammer the API server.
    assert time.monotonic() - t0 >= 0.5
    assert await addresses(d) == {"10.0.0.1:50051"}


async def test_bookmarks_move_the_version_a_watch_resumes_from(api, discovery_factory):
    api.put_slice("s", SERVICE, [Endpoint("10.0.0.1")])
    d = await discovery_factory()
    await eventually(lambda: api.open_watches == 1, timeout=5, what="watch open")
    assert api.requests[-1][1]["allowWatchBookmarks"].lower() == "true"
    api.put_slice("unrelated", "other-service", [Endpoint("10.9.9.9")])  # moves the global version
    api.bookmark()
    await eventually(lambda: d.resource_version == str(api.version), timeout=5, what="bookmark applied")
    watches = api.watch_count
    api.drop_watches()
    await eventually(lambda: api.watch_count > watches, timeout=5, what="watch resumed")
    kind, query = api.requests[-1]
    assert kind == "watch" and query["resourceVersion"] == str(api.version)
    assert d.lists == 1


async def test_a_change_reaches_hosts_within_a_second(api, discovery_factory):
    api.put_slice("s", SERVICE, [Endpoint("10.0.0.1")])
    calls: list[list[str]] = []
    d = await discovery_factory(on_change=lambda hosts: calls.append([h.address for h in hosts]))
    await eventually(lambda: api.open_watches == 1, timeout=5, what="watch open")
    d.changed.clear()
    t0 = time.monotonic()
    api.set_endpoints("s", [Endpoint("10.0.0.1"), Endpoint("10.0.0.5")])
    async with asyncio.timeout(1.0):
        await d.changed.wait()
    assert time.monotonic() - t0 < 1.0
    assert await addresses(d) == {"10.0.0.1:50051", "10.0.0.5:50051"}
    assert calls[-1] == ["10.0.0.1:50051", "10.0.0.5:50051"]


async def test_start_is_bounded_when_the_api_is_down_and_hosts_come_later(api, discovery_factory):
    api.put_slice("s", SERVICE, [Endpoint("10.0.0.1")])
    api.start_outage()
    t0 = time.monotonic()
    d = await discovery_factory(start_timeout_s=0.5)
    assert time.monotonic() - t0 < 3.0
    assert await d.hosts() == [] and not d.synced
    api.end_outage()
    await eventually(until(d, {"10.0.0.1:50051"}), timeout=5, what="hosts after the API came back")


async def test_a_wrong_token_is_an_api_error_not_a_crash(api, discovery_factory):
    api.put_slice("s", SERVICE, [Endpoint("10.0.0.1")])
    api.token = "rotated"  # the kubeconfig's token no longer works: 401
    d = await discovery_factory(start_timeout_s=0.3)
    assert await d.hosts() == []
    api.token = TOKEN
    await eventually(until(d, {"10.0.0.1:50051"}), timeout=5, what="hosts once the token works")


async def test_a_missing_kubeconfig_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    d = KubernetesDiscovery(namespace="default", kubeconfig=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="RUSTIC_K8S_KUBECONFIG"):
        await d.start()
    await d.close()


async def test_settings_build_a_kubernetes_discovery(kubeconfig, api):
    api.put_slice("s", "hosts", [Endpoint("10.0.0.1")], port_name="rpc", port=6000, namespace="fleet")
    settings = EngineSettings.from_env(
        {"RUSTIC_K8S_DISCOVERY": "kubernetes", "RUSTIC_K8S_NAMESPACE": "fleet", "RUSTIC_K8S_SERVICE": "hosts",
         "RUSTIC_K8S_PORT_NAME": "rpc", "RUSTIC_K8S_KUBECONFIG": kubeconfig, "RUSTIC_K8S_BACKOFF_MAX_S": "1"}
    )
    d = discovery_from_settings(settings, registry=None)  # type: ignore[arg-type]
    assert isinstance(d, KubernetesDiscovery)
    async with d:
        assert [h.address for h in await d.hosts()] == ["10.0.0.1:6000"]


async def test_engine_places_agents_on_hosts_the_endpoint_slices_list(
    api, kubeconfig, start_host, engine_settings, messaging, probe_factory
):
    hosts = [start_host("pod-a"), start_host("pod-b")]
    # One slice per host: on 127.0.0.1 the two hosts differ by port, and a slice has one port set.
    for i, h in enumerate(hosts):
        ip, port = h.address.rsplit(":", 1)
        api.put_slice(f"hosts-{i}", SERVICE, [Endpoint(ip, pod=h.name)], port=int(port))
    discovery = KubernetesDiscovery(namespace="default", service=SERVICE, kubeconfig=kubeconfig,
                                    backoff_initial_s=0.05, backoff_max_s=0.3)
    guild = guild_spec(f"guild-{uuid.uuid4().hex[:8]}")
    async with AsyncK8sEngine(engine_settings, discovery=discovery, organization_id="test-org") as engine:
        assert {h.address for h in await engine.hosts()} == {h.address for h in hosts}
        records = [await engine.run_agent(guild, responder(f"r{i}"), messaging, machine_id=i + 1) for i in range(2)]
        assert {r.host for r in records} == {h.address for h in hosts}
        probe = probe_factory(guild.id)
        for r in records:
            assert await answers(probe, r.agent_id)
        # A host whose pod turns not ready leaves the engine's view.
        api.set_endpoints("hosts-1", [Endpoint(hosts[1].address.rsplit(":", 1)[0], ready=False)])

        async def only_first():
            return {h.address for h in await engine.hosts()} == {hosts[0].address}

        await eventually(only_first, timeout=5, what="not-ready host gone from the engine's view")
