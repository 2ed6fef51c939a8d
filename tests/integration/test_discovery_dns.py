"""DNS discovery: real lookups of "localhost", scripted resolvers for failures and changes,
an engine placing agents through it, and the compose demo run against real hosts.

Failing lookups use an injected resolver that raises what loop.getaddrinfo raises
(socket.gaierror): a real unresolvable name would send a query to the machine's DNS
server, and tests talk to nothing but this machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import uuid
from pathlib import Path

import pytest
from support.eventually import eventually
from support.fleet import answers
from support.probe import guild_spec, responder

from rustic_ai.k8s import AsyncK8sEngine, ConfigError, EngineSettings
from rustic_ai.k8s.placement.dns import DnsDiscovery, resolve_all
from rustic_ai.k8s.placement.factory import discovery_from_settings

ROOT = Path(__file__).resolve().parents[2]


class ScriptedResolver:
    """Answers with ``answer``, or raises ``error`` when set; counts lookups."""

    def __init__(self, answer: list[str]) -> None:
        self.answer = answer
        self.error: OSError | None = None
        self.calls = 0

    async def __call__(self, name: str) -> list[str]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return list(self.answer)


def addresses(hosts) -> list[str]:
    return [h.address for h in hosts]


async def test_localhost_resolves_to_loopback_addresses_with_the_port():
    async with DnsDiscovery("localhost", 50051) as d:
        found = addresses(await d.hosts())
    assert "127.0.0.1:50051" in found
    for address in found:
        host, port = address.rsplit(":", 1)
        assert port == "50051"
        if host.startswith("["):
            assert host.endswith("]")  # IPv6 bracketed: [::1]:50051
        assert ipaddress.ip_address(host.strip("[]")).is_loopback
    assert len(found) == len(set(found))


async def test_resolve_all_returns_each_address_once():
    found = await resolve_all("localhost")
    assert "127.0.0.1" in found and len(found) == len(set(found))


async def test_a_name_that_does_not_resolve_gives_no_hosts_and_a_logged_error(caplog):
    resolver = ScriptedResolver([])
    resolver.error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    caplog.set_level(logging.WARNING, logger="rustic_ai.k8s.placement.dns")
    async with DnsDiscovery("agent-host", 50051, resolver=resolver) as d:
        assert await d.hosts() == []
        assert isinstance(d.last_error, socket.gaierror)
    assert any("cannot resolve 'agent-host'" in r.getMessage() for r in caplog.records)


async def test_lookup_failures_keep_the_last_good_answer_and_refresh_picks_up_changes():
    resolver = ScriptedResolver(["10.0.0.1", "10.0.0.2"])
    async with DnsDiscovery("agent-host", 7000, refresh_s=0.05, resolver=resolver) as d:
        assert addresses(await d.hosts()) == ["10.0.0.1:7000", "10.0.0.2:7000"]
        d.changed.clear()
        resolver.answer = ["10.0.0.2", "10.0.0.3", "fd00::3"]  # a replica replaced, one added

        async def changed():
            return addresses(await d.hosts()) == ["10.0.0.2:7000", "10.0.0.3:7000", "[fd00::3]:7000"]

        await eventually(changed, timeout=5, what="refresh picked up the new answer")
        assert d.changed.is_set()
        resolver.error = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        calls = resolver.calls
        await eventually(lambda: resolver.calls >= calls + 3, timeout=5, what="failed lookups")
        assert addresses(await d.hosts()) == ["10.0.0.2:7000", "10.0.0.3:7000", "[fd00::3]:7000"]
        assert d.last_error is resolver.error
        resolver.error = None
        resolver.answer = ["10.0.0.3"]

        async def recovered():
            return addresses(await d.hosts()) == ["10.0.0.3:7000"] and d.last_error is None

        await eventually(recovered, timeout=5, what="answer after recovery")


async def test_start_is_bounded_when_the_resolver_hangs():
    never = asyncio.Event()

    async def hanging(name: str) -> list[str]:
        await never.wait()
        return []

    d = DnsDiscovery("agent-host", 50051, start_timeout_s=0.2, resolver=hanging)
    async with asyncio.timeout(3):
        await d.start()
    try:
        assert await d.hosts() == [] and isinstance(d.last_error, TimeoutError)
    finally:
        await d.close()


def test_settings_build_a_dns_discovery():
    settings = EngineSettings.from_env(
        {"RUSTIC_K8S_DISCOVERY": "dns", "RUSTIC_K8S_DNS_NAME": "agent-host", "RUSTIC_K8S_DNS_PORT": "6000",
         "RUSTIC_K8S_DNS_REFRESH_S": "2.5"}
    )
    d = discovery_from_settings(settings, registry=None)  # type: ignore[arg-type]
    assert isinstance(d, DnsDiscovery) and (d.name, d.port, d.refresh_s) == ("agent-host", 6000, 2.5)
    with pytest.raises(ConfigError, match="RUSTIC_K8S_DNS_NAME"):
        EngineSettings.from_env({"RUSTIC_K8S_DISCOVERY": "dns"})
    with pytest.raises(ConfigError, match="RUSTIC_K8S_DISCOVERY"):
        EngineSettings.from_env({"RUSTIC_K8S_DISCOVERY": "mdns"})


def free_port_on(*ips: str) -> int:
    """A port free on every one of ``ips`` (hosts on 127.0.0.1 and 127.0.0.2 share it)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((ips[0], 0))
            port = s.getsockname()[1]
        try:
            for ip in ips[1:]:
                with socket.socket() as s:
                    s.bind((ip, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no common free port")


async def test_engine_places_agents_on_every_address_of_the_name(
    start_host, engine_settings, messaging, probe_factory
):
    # Two hosts on the same port at two loopback addresses: what one name with two A
    # records (two replicas) looks like. The scripted resolver is that name's answer.
    port = free_port_on("127.0.0.1", "127.0.0.2")
    hosts = [start_host(f"replica-{i}", env={"RUSTIC_AGENT_HOST_LISTEN": f"127.0.0.{i + 1}:{port}"})
             for i in range(2)]
    discovery = DnsDiscovery("agent-host", port, refresh_s=0.2,
                             resolver=ScriptedResolver(["127.0.0.1", "127.0.0.2"]))
    guild = guild_spec(f"guild-{uuid.uuid4().hex[:8]}")
    async with AsyncK8sEngine(engine_settings, discovery=discovery, organization_id="test-org") as engine:
        assert {h.address for h in await engine.hosts()} == {h.address for h in hosts}
        records = [await engine.run_agent(guild, responder(f"r{i}"), messaging, machine_id=i + 1) for i in range(2)]
        assert {r.host for r in records} == {h.address for h in hosts}
        probe = probe_factory(guild.id)
        for r in records:
            assert await answers(probe, r.agent_id)

