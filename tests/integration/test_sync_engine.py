"""K8sExecutionEngine as users reach it: built by unchanged rusticai-core Guilds, several per process."""

from __future__ import annotations

import os
import uuid

import pytest

from rustic_ai.core.guild.guild import Guild
from rustic_ai.k8s import HostUnavailableError
from support.eventually import eventually_sync
from support.hosts import pid_alive
from support.probe import Probe, responder

K8S_ENGINE = "rustic_ai.k8s.K8sExecutionEngine"


@pytest.fixture
def k8s_env(redis_url, key_prefix, monkeypatch):
    monkeypatch.setenv("RUSTIC_K8S_REDIS_URL", redis_url)
    monkeypatch.setenv("RUSTIC_K8S_KEY_PREFIX", key_prefix)


def new_guild(messaging) -> Guild:
    return Guild(id=f"g-{uuid.uuid4().hex[:8]}", name="sync engine test", description="a guild", organization_id="test-org",
                 execution_engine_clz=K8S_ENGINE, messaging_config=messaging)


def pid_of(guild: Guild, agent_id: str) -> int:
    records = [r for r in guild._get_execution_engine().list_agents(guild.id) if r.agent_id == agent_id]
    assert records and records[0].pid > 0, f"{agent_id} is not listed with a pid"
    return records[0].pid


def answers(probe: Probe, agent_id: str) -> bool:
    probe.clear()

    def check() -> bool:
        if probe.acks_from(agent_id):
            return True
        probe.hello()
        return False

    return eventually_sync(check, timeout=15, interval=0.3, what=f"{agent_id} answering")


def connections_to(ports: set[int]) -> set[tuple[str, str]]:
    """(local, remote) of this process's established TCP connections to these ports, from /proc."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
                if state == "01" and inode in inodes and int(remote.rsplit(":", 1)[1], 16) in ports:
                    found.add((local, remote))
    return found


def test_a_guild_shuts_down_only_its_own_agents(two_hosts, k8s_env, messaging):
    first, second = new_guild(messaging), new_guild(messaging)
    probe = Probe(second.id, messaging)
    try:
        first.launch_agent(responder("one"))
        second.launch_agent(responder("two"))
        one, two = pid_of(first, "one"), pid_of(second, "two")

        first.shutdown()
        eventually_sync(lambda: not pid_alive(one), timeout=15, what="the first guild's agent exiting")
        assert pid_alive(two)
        assert answers(probe, "two")
        with pytest.raises(HostUnavailableError, match="shut down"):
            first._get_execution_engine().run_agent(first.to_spec(), responder("late"), messaging, machine_id=9)

        second.launch_agent(responder("three"))  # the other guild's engine is unaffected
        three = pid_of(second, "three")
    finally:
        second.shutdown()
        probe.close()
    eventually_sync(lambda: not pid_alive(two) and not pid_alive(three), timeout=15,
                    what="the second guild's agents exiting")


def test_guilds_of_one_process_reuse_its_connections(two_hosts, k8s_env, messaging, redis_server):
    """A Guild builds an engine of its own; its first launch must not set up Redis and gRPC anew
    (each new connection is a TCP handshake, a Redis HELLO and an HTTP/2 set-up on the launch path)."""
    host_ports = {int(h.address.rsplit(":", 1)[1]) for h in two_hosts}
    snapshots: list[set[tuple[str, str]]] = []
    for i in range(5):
        guild = new_guild(messaging)
        try:
            guild.launch_agent(responder(f"r{i}"))
            snapshots.append(connections_to({redis_server.port} | host_ports))
        finally:
            guild.shutdown()
    redis_port = f":{redis_server.port:04X}"
    to_redis = [{c for c in s if c[1].endswith(redis_port)} for s in snapshots]
    assert to_redis[0], "no connection to Redis found in /proc"
    # One pool for all five guilds: at most one more connection than any single moment held.
    ever = set().union(*to_redis)
    assert len(ever) <= max(len(s) for s in to_redis) + 1, f"Redis connections per guild: {to_redis}"
    for port in host_ports:  # one gRPC channel per host, whichever guilds used it
        tag = f":{port:04X}"
        assert len({c for s in snapshots for c in s if c[1].endswith(tag)}) <= 1
