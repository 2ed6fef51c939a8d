from __future__ import annotations

import pytest

from rustic_ai.k8s import AsyncK8sEngine, EngineSettings
from support.hosts import HostProcess, start_hosts
from support.probe import Probe, redis_messaging


@pytest.fixture
def start_host(redis_url, key_prefix):
    """Factory: starts real `rustic-agent-host` processes; stops them after the test."""
    started: list[HostProcess] = []

    def start(name: str | None = None, env: dict[str, str] | None = None, args: list[str] | None = None):
        host = HostProcess(redis_url, key_prefix, name=name or f"host-{len(started) + 1}", env=env, args=args)
        started.append(host)
        return host

    yield start
    for host in started:
        host.close()


@pytest.fixture(scope="module")
def two_hosts(redis_url, key_prefix):
    """Two real agent hosts shared by a test module; tests keep to their own guild ids."""
    hosts = start_hosts(redis_url, key_prefix, ["host-a", "host-b"])
    yield hosts
    for host in hosts:
        host.close()


@pytest.fixture
def engine_settings(redis_url, key_prefix) -> EngineSettings:
    return EngineSettings.from_env({}, redis_url=redis_url, key_prefix=key_prefix, call_timeout_s=5.0,
                                   launch_timeout_s=30.0, discovery_refresh_s=0.2)


@pytest.fixture
async def engine(engine_settings):
    async with AsyncK8sEngine(engine_settings, organization_id="test-org") as eng:
        yield eng


@pytest.fixture
def messaging(redis_server):
    return redis_messaging(redis_server.port)


@pytest.fixture
def probe_factory(messaging):
    probes: list[Probe] = []

    def make(guild_id: str) -> Probe:
        p = Probe(guild_id, messaging)
        probes.append(p)
        return p

    yield make
    for p in probes:
        p.close()
