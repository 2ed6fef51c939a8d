"""The engine's side of the wire: one `HostClient` per host, channels kept in a pool.

A grpc.aio channel multiplexes any number of concurrent calls over one HTTP/2
connection, so one channel per host is enough; the pool reuses it for every call and
closes it when discovery stops listing the host. Every call carries a deadline. Status
codes come back as our error classes (status.py) with the host's address in the message.

With credentials that reload (tls.ReloadingChannelCredentials) each call asks the pool
for its host's channel, and a channel made with an older generation of credentials is
replaced by a new one; the old one closes once its calls in flight are done (at most a
launch deadline later), so a rotation neither fails a call under way nor leaves a
connection that will not reconnect with the new certificate.
"""

from __future__ import annotations

import asyncio
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
from .tls import ReloadingChannelCredentials
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
    def __init__(self, address: str, stub: Callable[[], pb_grpc.AgentHostServiceStub], *, call_timeout_s: float,
                 launch_timeout_s: float, observer: CallObserver | None = None):
        """``stub``: the host's stub for the next call (the pool's current channel)."""
        self.address = address
        self._stub = stub
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
            stub = self._stub()  # the host's current channel (a new one after a credential reload)
            return await getattr(stub, method)(request, timeout=timeout, metadata=tuple(carrier.items()) or None)
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
        msg = convert.launch_to_pb(request)
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

    async def request_hold(self, requester: str, timeout: float, lease_expires_ms: int = 0) -> float:
        """Asks this host for a hold (see HealthRequest.hold_for); seconds granted, 0 if refused."""
        request = pb.HealthRequest(hold_for=requester, hold_lease_expires_ms=lease_expires_ms)
        reply = await self._call("Health", request, timeout)
        return max(0.0, float(reply.hold_granted_s))


class _Channel:
    def __init__(self, channel: grpc.aio.Channel, generation: int) -> None:
        self.channel = channel
        self.stub = pb_grpc.AgentHostServiceStub(channel)
        self.generation = generation


class ChannelPool:
    """One reused grpc.aio channel per host address."""

    def __init__(
        self,
        *,
        call_timeout_s: float = 10.0,
        launch_timeout_s: float = 90.0,
        max_message_bytes: int = 4 * 1024 * 1024,
        credentials: grpc.ChannelCredentials | ReloadingChannelCredentials | None = None,
        server_name: str = "",
        observer: CallObserver | None = None,
    ) -> None:
        """``credentials``: TLS (see tls.py; reloading ones follow their files), else plain text;
        ``server_name``: the name host certificates carry; ``observer`` sees every call (metrics)."""
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
        self._clients: dict[str, HostClient] = {}
        self._channels: dict[str, _Channel] = {}
        self._retiring: dict[asyncio.Task, grpc.aio.Channel] = {}  # old channels closing after their calls
        self._closed = False
        self.channels_replaced = 0  # after credential reloads (for logs and tests)

    def client(self, address: str) -> HostClient:
        if self._closed:
            raise HostUnavailableError("channel pool is closed (engine shut down)")
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = HostClient(
                address, lambda: self._stub(address), call_timeout_s=self._call_timeout_s,
                launch_timeout_s=self._launch_timeout_s, observer=self._observer,
            )
        return client

    def _stub(self, address: str) -> pb_grpc.AgentHostServiceStub:
        """The stub for the next call to ``address``: its channel, new if the credentials were reloaded."""
        if self._closed:
            raise HostUnavailableError("channel pool is closed (engine shut down)")
        if isinstance(self._credentials, ReloadingChannelCredentials):
            generation, credentials = self._credentials.current()
        else:
            generation, credentials = 0, self._credentials
        entry = self._channels.get(address)
        if entry is not None and entry.generation != generation:
            self._retire(address, entry)
            entry = None
        if entry is None:
            if credentials is None:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            else:
                channel = grpc.aio.secure_channel(address, credentials, options=self._options)
            entry = self._channels[address] = _Channel(channel, generation)
        return entry.stub

    def _retire(self, address: str, entry: _Channel) -> None:
        del self._channels[address]
        self.channels_replaced += 1
        log.info("new TLS credentials: replacing the channel to %s (the old one closes after its calls)", address)
        task = asyncio.get_running_loop().create_task(entry.channel.close(self._launch_timeout_s),
                                                      name=f"retire-channel:{address}")
        self._retiring[task] = entry.channel
        task.add_done_callback(lambda t: self._retiring.pop(t, None))

    @property
    def addresses(self) -> list[str]:
        return sorted(self._clients)

    async def retain(self, addresses: Iterable[str]) -> None:
        """Closes the channels of hosts that are no longer listed."""
        keep = set(addresses)
        # A HostClient kept by a caller past retain() reopens a channel at its next call: close those too.
        gone = [a for a in self._clients.keys() | self._channels.keys() if a not in keep]
        await asyncio.gather(*(self._discard(a) for a in gone))

    async def _discard(self, address: str) -> None:
        self._clients.pop(address, None)
        entry = self._channels.pop(address, None)
        if entry is not None:
            log.debug("closing channel to %s", address)
            await entry.channel.close()

    async def close(self) -> None:
        self._closed = True
        # Retiring channels are closed now, their calls cancelled: the owner is shutting down.
        retiring = dict(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        await asyncio.gather(*(channel.close(None) for channel in retiring.values()))
        await asyncio.gather(*(self._discard(a) for a in self._clients.keys() | self._channels.keys()))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
