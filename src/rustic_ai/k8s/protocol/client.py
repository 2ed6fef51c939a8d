"""The engine's side of the wire: one `HostClient` per host, channels kept in a pool.

A grpc.aio channel multiplexes any number of concurrent calls over one HTTP/2
connection, so one channel per host is enough; the pool reuses it for every call and
closes it when discovery stops listing the host. Every call carries a deadline. Status
codes come back as our error classes (status.py) with the host's address in the message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from typing import Self

import grpc

from ..base.errors import HostUnavailableError, InvalidSpecError, RusticK8sError
from ..base.models import AgentKey, AgentRecord, HostRecord, LaunchRequest
from . import convert
from .status import CODE_TO_ERROR
from .v1 import agent_host_pb2 as pb
from .v1 import agent_host_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


def _to_error(address: str, method: str, err: grpc.aio.AioRpcError) -> RusticK8sError:
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        # gRPC's own size limit, not a full host: sending it elsewhere will not help.
        return InvalidSpecError(f"{method} request is over the maximum message size of host {address}: {details}")
    cls = CODE_TO_ERROR.get(code)
    if cls is None:
        return RusticK8sError(f"{method} on host {address} failed with {code.name}: {details}")
    if code == grpc.StatusCode.UNAVAILABLE and not details.strip():
        details = "host unreachable"
    return cls(details if address in details else f"host {address}: {details}")


class HostClient:
    def __init__(self, address: str, channel: grpc.aio.Channel, *, call_timeout_s: float, launch_timeout_s: float):
        self.address = address
        self._stub = pb_grpc.AgentHostServiceStub(channel)
        self._call_timeout_s = call_timeout_s
        self._launch_timeout_s = launch_timeout_s

    async def _call(self, method: str, request, timeout: float):
        try:
            return await getattr(self._stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise _to_error(self.address, method, err) from None

    async def create_agent(self, request: LaunchRequest, timeout: float | None = None) -> AgentRecord:
        msg = pb.CreateAgentRequest(
            guild_spec_json=json.dumps(request.guild_spec).encode(),
            agent_spec_json=json.dumps(request.agent_spec).encode(),
            messaging_config_json=json.dumps(request.messaging_config).encode(),
            machine_id=request.machine_id,
            client_type=request.client_type,
            client_properties_json=json.dumps(request.client_properties).encode(),
            organization_id=request.organization_id,
            default_topic=request.default_topic,
            restart_policy_json=json.dumps(request.restart).encode() if request.restart else b"",
        )
        reply = await self._call("CreateAgent", msg, timeout or self._launch_timeout_s)
        return convert.agent_from_pb(reply.agent)

    async def stop_agent(self, key: AgentKey, timeout: float | None = None) -> AgentRecord:
        reply = await self._call(
            "StopAgent", pb.StopAgentRequest(guild_id=key.guild_id, agent_id=key.agent_id),
            timeout or self._launch_timeout_s,
        )
        return convert.agent_from_pb(reply.agent)

    async def agent_info(self, key: AgentKey, output_lines: int = 0, timeout: float | None = None) -> AgentRecord:
        reply = await self._call(
            "GetAgentInfo",
            pb.GetAgentInfoRequest(guild_id=key.guild_id, agent_id=key.agent_id, output_lines=output_lines),
            timeout or self._call_timeout_s,
        )
        return convert.agent_from_pb(reply)

    async def list_agents(self, guild_id: str = "", timeout: float | None = None) -> list[AgentRecord]:
        reply = await self._call("ListAgents", pb.ListAgentsRequest(guild_id=guild_id), timeout or self._call_timeout_s)
        return [convert.agent_from_pb(a) for a in reply.agents]

    async def health(self, timeout: float | None = None) -> HostRecord:
        reply = await self._call("Health", pb.HealthRequest(), timeout or self._call_timeout_s)
        return convert.host_from_pb(reply)


class ChannelPool:
    """One reused grpc.aio channel per host address."""

    def __init__(
        self,
        *,
        call_timeout_s: float = 10.0,
        launch_timeout_s: float = 90.0,
        max_message_bytes: int = 4 * 1024 * 1024,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._call_timeout_s = call_timeout_s
        self._launch_timeout_s = launch_timeout_s
        self._credentials = credentials
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # Fail fast on a dead host instead of waiting out the whole deadline.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.keepalive_time_ms", 20000),
            ("grpc.keepalive_timeout_ms", 5000),
        ]
        self._clients: dict[str, tuple[grpc.aio.Channel, HostClient]] = {}
        self._closed = False

    def client(self, address: str) -> HostClient:
        if self._closed:
            raise HostUnavailableError("channel pool is closed (engine shut down)")
        entry = self._clients.get(address)
        if entry is None:
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            else:
                channel = grpc.aio.secure_channel(address, self._credentials, options=self._options)
            client = HostClient(
                address, channel, call_timeout_s=self._call_timeout_s, launch_timeout_s=self._launch_timeout_s
            )
            entry = self._clients[address] = (channel, client)
        return entry[1]

    @property
    def addresses(self) -> list[str]:
        return sorted(self._clients)

    async def retain(self, addresses: Iterable[str]) -> None:
        """Closes the channels of hosts that are no longer listed."""
        keep = set(addresses)
        gone = [a for a in self._clients if a not in keep]
        await asyncio.gather(*(self._discard(a) for a in gone))

    async def _discard(self, address: str) -> None:
        entry = self._clients.pop(address, None)
        if entry is not None:
            log.debug("closing channel to %s", address)
            await entry[0].close()

    async def close(self) -> None:
        self._closed = True
        await asyncio.gather(*(self._discard(a) for a in list(self._clients)))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
