"""Protobuf messages <-> our records. Nothing outside this package sees a pb type."""

from __future__ import annotations

import json

from ..base.models import AgentRecord, AgentState, HostRecord, HostState, LaunchRequest
from ..base.resources import HostInventory, Usage
from .v1 import agent_host_pb2 as pb

_AGENT_STATE_TO_PB = {
    AgentState.STARTING: pb.AGENT_STATE_STARTING,
    AgentState.RUNNING: pb.AGENT_STATE_RUNNING,
    AgentState.RESTARTING: pb.AGENT_STATE_RESTARTING,
    AgentState.FAILED: pb.AGENT_STATE_FAILED,
    AgentState.STOPPING: pb.AGENT_STATE_STOPPING,
    AgentState.STOPPED: pb.AGENT_STATE_STOPPED,
}
_AGENT_STATE_FROM_PB = {v: k for k, v in _AGENT_STATE_TO_PB.items()}
_HOST_STATE_TO_PB = {
    HostState.STARTING: pb.HOST_STATE_STARTING,
    HostState.SERVING: pb.HOST_STATE_SERVING,
    HostState.DRAINING: pb.HOST_STATE_DRAINING,
}
_HOST_STATE_FROM_PB = {v: k for k, v in _HOST_STATE_TO_PB.items()}


def agent_to_pb(r: AgentRecord) -> pb.AgentInfo:
    return pb.AgentInfo(
        guild_id=r.guild_id,
        agent_id=r.agent_id,
        name=r.name,
        class_name=r.class_name,
        agent_spec_json=r.spec_json.encode(),
        host_address=r.host,
        pid=r.pid,
        state=_AGENT_STATE_TO_PB[r.state],
        has_exit_code=r.exit_code is not None,
        exit_code=r.exit_code or 0,
        started_at=r.started_at,
        restarts=r.restarts,
        reason=r.reason,
        output=r.output,
        allocation_json=r.allocation.encode(),
    )


def agent_from_pb(m: pb.AgentInfo) -> AgentRecord:
    return AgentRecord(
        guild_id=m.guild_id,
        agent_id=m.agent_id,
        name=m.name,
        class_name=m.class_name,
        spec_json=m.agent_spec_json.decode(errors="replace"),
        host=m.host_address,
        pid=m.pid,
        state=_AGENT_STATE_FROM_PB.get(m.state, AgentState.STARTING),
        started_at=m.started_at,
        restarts=m.restarts,
        reason=m.reason,
        exit_code=m.exit_code if m.has_exit_code else None,
        output=list(m.output),
        allocation=m.allocation_json.decode(errors="replace"),
    )


def host_to_pb(h: HostRecord) -> pb.HealthResponse:
    return pb.HealthResponse(
        host_name=h.name,
        address=h.address,
        agents_running=h.agents,
        capacity=h.capacity,
        state=_HOST_STATE_TO_PB[h.state],
        version=h.version,
        started_at=h.started_at,
        inventory_json=h.inventory.to_json().encode(),
        usage_json=json.dumps({"cpu": h.usage.cpu, "mem": h.usage.mem, "gpu": dict(h.usage.gpus),
                               "custom": dict(h.usage.custom)}).encode(),
        labels_json=json.dumps(h.labels).encode(),
    )


def _labels(raw: bytes) -> dict[str, str]:
    try:
        d = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in d.items()} if isinstance(d, dict) else {}


def host_from_pb(m: pb.HealthResponse) -> HostRecord:
    return HostRecord(
        address=m.address,
        name=m.host_name,
        capacity=m.capacity,
        agents=m.agents_running,
        state=_HOST_STATE_FROM_PB.get(m.state, HostState.STARTING),
        version=m.version,
        started_at=m.started_at,
        inventory=HostInventory.from_json(m.inventory_json.decode(errors="replace")),
        usage=Usage.from_json(m.usage_json.decode(errors="replace")),
        labels=_labels(m.labels_json),
    )


def launch_to_pb(request: LaunchRequest) -> pb.CreateAgentRequest:
    """A launch request on the wire: specs as JSON bytes (the host validates them on arrival)."""
    return pb.CreateAgentRequest(
        guild_spec_json=json.dumps(request.guild_spec).encode(),
        agent_spec_json=json.dumps(request.agent_spec).encode(),
        messaging_config_json=json.dumps(request.messaging_config).encode(),
        machine_id=request.machine_id,
        client_type=request.client_type,
        client_properties_json=json.dumps(request.client_properties).encode(),
        organization_id=request.organization_id,
        default_topic=request.default_topic,
        restart_policy_json=json.dumps(request.restart).encode() if request.restart else b"",
        placement_json=json.dumps(request.placement).encode() if request.placement else b"",
    )
