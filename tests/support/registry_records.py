"""Small builders for registry tests: an agent record and a host heartbeat."""

from __future__ import annotations

from rustic_ai.k8s.base.models import AgentRecord, AgentState, HostRecord, HostState


def rec(guild: str, agent: str, host: str, **kw) -> AgentRecord:
    spec = f'{{"id": "{agent}", "name": "{agent}-name", "class_name": "pkg.Cls"}}'
    return AgentRecord(guild, agent, name=f"{agent}-name", class_name="pkg.Cls", spec_json=spec, host=host,
                       state=kw.pop("state", AgentState.RUNNING), **kw)


async def beat(registry, address, agents=(), capacity=10, state=HostState.SERVING):
    return await registry.heartbeat(HostRecord(address, capacity=capacity, state=state), list(agents))
