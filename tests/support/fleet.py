"""Questions tests ask a whole fleet: how many live copies of an agent, does it answer."""

from __future__ import annotations

from pathlib import Path

from rustic_ai.k8s import AgentState
from rustic_ai.k8s.base.models import AgentKey

from .eventually import eventually
from .hosts import HostProcess, pid_alive


async def live_copies(engine, hosts: list[HostProcess], key: AgentKey) -> list[tuple[str, int]]:
    """(host, pid) of every running copy of the agent, asking every host that answers."""
    copies = []
    for h in hosts:
        if h.proc.poll() is not None:
            continue
        try:
            records = await engine.pool.client(h.address).list_agents(key.guild_id, timeout=2)
        except Exception:  # noqa: BLE001 - a host that does not answer runs nothing we can see
            continue
        copies += [(h.address, r.pid) for r in records
                   if r.agent_id == key.agent_id and r.state == AgentState.RUNNING and pid_alive(r.pid)]
    return copies


async def answers(probe, agent_id: str, timeout: float = 15.0) -> bool:
    """Says hello until the agent acknowledges (the first hello may race its subscription)."""
    probe.clear()

    async def check():
        if not probe.acks_from(agent_id):
            probe.hello()
            return False
        return True

    await eventually(check, timeout=timeout, interval=0.3, what=f"{agent_id} answering")
    return True


def processes_with_env(marker: str) -> list[int]:
    """Pids of live processes whose environment contains ``marker`` (e.g. a key prefix)."""
    pids = []
    needle = marker.encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if needle in (d / "environ").read_bytes() and pid_alive(int(d.name)):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


async def peers_known(registry, addresses: list[str], timeout: float = 10.0) -> None:
    """Waits until each host in ``addresses`` has renewed its lease after all the others registered.

    A host learns its peers from its renewals; one cut off before it heard of a newcomer may
    hold its agents on the others' word, so the newcomer (rightly) will not reap it for its
    whole hold limit. Tests of partitions wait for this first.
    """
    meta = registry.keys.hosts_meta

    async def known() -> bool:
        fields = await registry.redis.hgetall(meta)
        since = {a: int(fields.get(f"{a}|since", "-1")) for a in addresses}
        renewed = {a: int(fields.get(f"{a}|renewed", "0 0 -1").split()[2]) for a in addresses}
        return all(renewed[a] > since[b] for a in addresses for b in addresses if a != b)

    await eventually(known, timeout=timeout, interval=0.05, what=f"{addresses} renewed after each other registered")
