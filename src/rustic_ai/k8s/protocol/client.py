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
import time
from collections.abc import Callable, Iterable
from typing import Self

import grpc
from opentelemetry import propagate

from ..base.errors import HostUnavailableError, InvalidSpecError, RusticK8sError
from ..base.models import AgentKey, AgentRecord, HostRecord, LaunchRequest
from . import convert
from .status import error_class_for
from .v1 import agent_host_pb2 as pb
from .v1 import agent_host_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


def _to_error(address: str, method: str, err: grpc.aio.AioRpcError) -> RusticK8sError:
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        # gRPC's own size limit, not a full host: sending it elsewhere will not help.
        return InvalidSpecError(f"{method} request is over the maximum message size of host {address}: {details}")
    cls = error_class_for(code, err.trailing_metadata())
    if cls is None:
        return RusticK8sError(f"{method} on host {address} failed with {code.name}: {details}")
    if code == grpc.StatusCode.UNAVAILABLE and not details.strip():
        details = "host unreachable"
    return cls(details if address in details else f"host {address}: {details}")


# (host address, method, status code name, seconds) for every call made: the engine's metrics hook.
CallObserver = Callable[[str, str, str, float], None]


class HostClient:
    def __init__(self, address: str, channel: grpc.aio.Channel, *, call_timeout_s: float, launch_timeout_s: float,
                 observer: CallObserver | None = None):
        self.address = address
        self._stub = pb_grpc.AgentHostServiceStub(channel)
        self._call_timeout_s = call_timeout_s
        self._launch_timeout_s = launch_timeout_s
        self._observer = observer

    async def _call(self, method: str, request, timeout: float):
        # The caller's trace context (W3C traceparent) travels as metadata; the host hands
        # it on to the agent process. Nothing is added when no span is active.
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        started = time.monotonic()
        code = "OK"
        try:
            return await getattr(self._stub, method)(request, timeout=timeout, metadata=tuple(carrier.items()) or None)
        except grpc.aio.AioRpcError as err:
            code = err.code().name
            raise _to_error(self.address, method, err) from None
        except BaseException:
            code = "CANCELLED"
            raise
        finally:
            if self._observer is not None:
                self._observer(self.address, method, code, time.monotonic() - started)

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
            placement_json=json.dumps(request.placement).encode() if request.placement else b"",
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

    async def request_hold(self, requester: str, timeout: float) -> float:
        """Asks this host for a hold (see HealthRequest.hold_for); seconds granted, 0 if refused."""
        reply = await self._call("Health", pb.HealthRequest(hold_for=requester), timeout)
        return max(0.0, float(reply.hold_granted_s))


class ChannelPool:
    """One reused grpc.aio channel per host address."""

    def __init__(
        self,
        *,
        call_timeout_s: float = 10.0,
        launch_timeout_s: float = 90.0,
        max_message_bytes: int = 4 * 1024 * 1024,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
        observer: CallObserver | None = None,
    ) -> None:
        """``credentials``: TLS (see tls.py), else plain text; ``server_name``: the name host certificates carry;
        ``observer`` sees every call (metrics)."""
        self._call_timeout_s = call_timeout_s
        self._observer = observer
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
        if server_name:
            self._options.append(("grpc.ssl_target_name_override", server_name))
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
                address, channel, call_timeout_s=self._call_timeout_s, launch_timeout_s=self._launch_timeout_s,
                observer=self._observer,
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
