"""The host's side of the wire: a grpc.aio server in front of any `HostApi`.

The servicer decodes requests into our models, calls the host, and turns our errors
into status codes (status.py). It knows nothing about processes or Redis, and the host
knows nothing about grpc. The standard grpc.health.v1 service is served beside it so
Kubernetes probes and `grpc_health_probe` work unchanged.
"""

from __future__ import annotations

import logging
from typing import Protocol, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from ..base.errors import RusticK8sError
from ..base.models import AgentKey, AgentRecord, HostRecord, LaunchRequest
from ..base.specs import build_launch_request
from . import convert
from .status import code_for
from .v1 import agent_host_pb2 as pb
from .v1 import agent_host_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "rustic_ai.k8s.v1.AgentHostService"


class HostApi(Protocol):
    """What the server adapter needs from an agent host."""

    async def create_agent(self, request: LaunchRequest) -> AgentRecord: ...
    async def stop_agent(self, key: AgentKey) -> AgentRecord: ...
    async def agent_info(self, key: AgentKey, output_lines: int) -> AgentRecord: ...
    async def list_agents(self, guild_id: str) -> list[AgentRecord]: ...
    def health(self) -> HostRecord: ...


class _Servicer(pb_grpc.AgentHostServiceServicer):
    def __init__(self, api: HostApi) -> None:
        self.api = api

    async def _fail(self, context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
        code = code_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed unexpectedly", method)
            await context.abort(code, f"{method} failed: {type(exc).__name__}: {exc}")
        log.info("%s refused: %s: %s", method, code.name, exc)
        await context.abort(code, str(exc))

    async def CreateAgent(self, request: pb.CreateAgentRequest, context: grpc.aio.ServicerContext):
        try:
            launch = build_launch_request(
                guild_spec_json=request.guild_spec_json,
                agent_spec_json=request.agent_spec_json,
                messaging_config_json=request.messaging_config_json,
                machine_id=request.machine_id,
                client_type=request.client_type,
                client_properties_json=request.client_properties_json,
                organization_id=request.organization_id,
                default_topic=request.default_topic,
                restart_policy_json=request.restart_policy_json,
            )
            record = await self.api.create_agent(launch)
        except (RusticK8sError, Exception) as exc:  # noqa: BLE001 - every failure becomes a status
            await self._fail(context, "CreateAgent", exc)
        return pb.CreateAgentResponse(agent=convert.agent_to_pb(record))

    async def StopAgent(self, request: pb.StopAgentRequest, context: grpc.aio.ServicerContext):
        try:
            record = await self.api.stop_agent(AgentKey(request.guild_id, request.agent_id))
        except Exception as exc:  # noqa: BLE001
            await self._fail(context, "StopAgent", exc)
        return pb.StopAgentResponse(agent=convert.agent_to_pb(record))

    async def GetAgentInfo(self, request: pb.GetAgentInfoRequest, context: grpc.aio.ServicerContext):
        try:
            record = await self.api.agent_info(AgentKey(request.guild_id, request.agent_id), request.output_lines)
        except Exception as exc:  # noqa: BLE001
            await self._fail(context, "GetAgentInfo", exc)
        return convert.agent_to_pb(record)

    async def ListAgents(self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext):
        try:
            records = await self.api.list_agents(request.guild_id)
        except Exception as exc:  # noqa: BLE001
            await self._fail(context, "ListAgents", exc)
        return pb.ListAgentsResponse(agents=[convert.agent_to_pb(r) for r in records])

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext):
        return convert.host_to_pb(self.api.health())


class GrpcHostServer:
    """Owns the grpc.aio server: bind, serve, flip health, stop with a grace period."""

    def __init__(
        self,
        api: HostApi,
        listen: str,
        *,
        max_message_bytes: int,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self._api = api
        self._listen = listen
        self._max_message_bytes = max_message_bytes
        self._credentials = credentials
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self.port = 0

    async def start(self) -> int:
        """Binds and starts serving; returns the bound port (useful with port 0)."""
        if self._server is not None:
            return self.port
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self._max_message_bytes),
                ("grpc.max_send_message_length", self._max_message_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        pb_grpc.add_AgentHostServiceServicer_to_server(_Servicer(self._api), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if self._credentials is None:
            self.port = server.add_insecure_port(self._listen)
        else:
            self.port = server.add_secure_port(self._listen, self._credentials)
        if self.port == 0:
            raise OSError(f"could not bind gRPC server to {self._listen}")
        await server.start()
        self._server = server
        await self.set_serving(True)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def stop(self, grace_s: float | None = 5.0) -> None:
        server, self._server = self._server, None
        if server is not None:
            await self._health.enter_graceful_shutdown()
            await server.stop(grace_s)

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
