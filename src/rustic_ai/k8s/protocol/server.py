"""The host's side of the wire: a grpc.aio server in front of any `HostApi`.

The servicer decodes requests into our models, calls the host, and turns our errors
into status codes (status.py). It knows nothing about processes or Redis, and the host
knows nothing about grpc. The standard grpc.health.v1 service is served beside it so
Kubernetes probes and `grpc_health_probe` work unchanged.

With an authorization policy (base/authz.py) every call but Health is checked against
the caller's client certificate, as gRPC reports it in the call's auth context, before
the host sees it; a refusal is PERMISSION_DENIED naming the identity.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from ..base.authz import Identity, PolicyFile
from ..base.errors import RusticK8sError
from ..base.logfields import agent_log_fields
from ..base.models import AgentKey, AgentRecord, HostRecord, LaunchRequest
from ..base.specs import build_launch_request
from . import convert
from .status import ERROR_CLASS_KEY, code_for
from .v1 import agent_host_pb2 as pb
from .v1 import agent_host_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "rustic_ai.k8s.v1.AgentHostService"

# W3C trace context headers carried from the caller's metadata into the launch request
# (and so into the agent process); anything longer is not a trace context and is dropped.
TRACE_HEADERS = ("traceparent", "tracestate")
_TRACE_HEADER_MAX = 512

# (method, status code name, seconds) for every call answered: the host's metrics hook.
CallObserver = Callable[[str, str, float], None]


def _trace_context(context: grpc.aio.ServicerContext) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if key in TRACE_HEADERS and isinstance(value, str) and len(value) <= _TRACE_HEADER_MAX:
            out[key] = value
    return out


def peer_identity(context: grpc.aio.ServicerContext) -> Identity:
    """The caller's certificate names: subject CN and every SAN (DNS, URI such as spiffe://, IP)."""
    auth = context.auth_context() or {}

    def decoded(key: str) -> list[str]:
        return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in auth.get(key, ())]

    common = decoded("x509_common_name")
    return Identity(common[0] if common else "", tuple(decoded("x509_subject_alternative_name")))


class HostApi(Protocol):
    """What the server adapter needs from an agent host."""

    async def create_agent(self, request: LaunchRequest) -> AgentRecord: ...
    async def stop_agent(self, key: AgentKey) -> AgentRecord: ...
    async def agent_info(self, key: AgentKey, output_lines: int) -> AgentRecord: ...
    async def list_agents(self, guild_id: str) -> list[AgentRecord]: ...
    def health(self) -> HostRecord: ...
    async def grant_hold(self, requester: str, lease_expires_ms: int = 0) -> float: ...


class _Servicer(pb_grpc.AgentHostServiceServicer):
    def __init__(self, api: HostApi, observer: CallObserver | None = None, policy: PolicyFile | None = None) -> None:
        self.api = api
        self._observer = observer
        self._policy = policy

    def _authorize(self, context: grpc.aio.ServicerContext, action: str, guild_id: str,
                   agent_class: str = "") -> None:
        """Raises NotAuthorizedError unless the policy (if any) lets the caller do this."""
        if self._policy is not None:
            self._policy.current().check(peer_identity(context), action, guild_id, agent_class)

    def _observe(self, method: str, code: grpc.StatusCode, started: float) -> None:
        if self._observer is not None:
            try:
                self._observer(method, code.name, time.monotonic() - started)
            except Exception:  # metrics must never fail a call
                log.exception("call observer failed")

    async def _fail(self, context: grpc.aio.ServicerContext, method: str, exc: Exception,
                    started: float | None = None) -> None:
        code = code_for(exc)
        if started is not None:
            self._observe(method, code, started)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed unexpectedly", method)
            await context.abort(code, f"{method} failed: {type(exc).__name__}: {exc}")
        log.info("%s refused: %s: %s", method, code.name, exc)
        await context.abort(code, str(exc), trailing_metadata=((ERROR_CLASS_KEY, type(exc).__name__),))

    async def CreateAgent(self, request: pb.CreateAgentRequest, context: grpc.aio.ServicerContext):
        started = time.monotonic()
        try:
            if self._policy is not None:
                self._policy.current().check_action(peer_identity(context), "launch")
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
                placement_json=request.placement_json,
                trace_context=_trace_context(context),
            )
        except (RusticK8sError, Exception) as exc:  # noqa: BLE001 - every failure becomes a status
            await self._fail(context, "CreateAgent", exc, started)
        # Log lines about this agent, the refusal included, carry its ids (base/logfields.py).
        with agent_log_fields(launch.key.guild_id, launch.key.agent_id):
            try:
                # A class name of the wrong type fails the module check, then spec validation.
                self._authorize(context, "launch", launch.key.guild_id, str(launch.agent_spec.get("class_name") or ""))
                record = await self.api.create_agent(launch)
            except (RusticK8sError, Exception) as exc:  # noqa: BLE001
                await self._fail(context, "CreateAgent", exc, started)
        self._observe("CreateAgent", grpc.StatusCode.OK, started)
        return pb.CreateAgentResponse(agent=convert.agent_to_pb(record))

    async def StopAgent(self, request: pb.StopAgentRequest, context: grpc.aio.ServicerContext):
        started = time.monotonic()
        with agent_log_fields(request.guild_id, request.agent_id):
            try:
                self._authorize(context, "stop", request.guild_id)
                record = await self.api.stop_agent(AgentKey(request.guild_id, request.agent_id))
            except Exception as exc:  # noqa: BLE001
                await self._fail(context, "StopAgent", exc, started)
        self._observe("StopAgent", grpc.StatusCode.OK, started)
        return pb.StopAgentResponse(agent=convert.agent_to_pb(record))

    async def GetAgentInfo(self, request: pb.GetAgentInfoRequest, context: grpc.aio.ServicerContext):
        started = time.monotonic()
        with agent_log_fields(request.guild_id, request.agent_id):
            try:
                self._authorize(context, "read", request.guild_id)
                record = await self.api.agent_info(AgentKey(request.guild_id, request.agent_id),
                                                   request.output_lines)
            except Exception as exc:  # noqa: BLE001
                await self._fail(context, "GetAgentInfo", exc, started)
        self._observe("GetAgentInfo", grpc.StatusCode.OK, started)
        return convert.agent_to_pb(record)

    async def ListAgents(self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext):
        started = time.monotonic()
        try:
            if request.guild_id or self._policy is None:
                self._authorize(context, "read", request.guild_id)
                records = await self.api.list_agents(request.guild_id)
            else:  # every guild: the ones this caller may read
                readable = self._policy.current().readable_guilds(peer_identity(context))
                records = [r for r in await self.api.list_agents("") if readable(r.key.guild_id)]
        except Exception as exc:  # noqa: BLE001
            await self._fail(context, "ListAgents", exc, started)
        self._observe("ListAgents", grpc.StatusCode.OK, started)
        return pb.ListAgentsResponse(agents=[convert.agent_to_pb(r) for r in records])

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext):
        started = time.monotonic()
        granted = 0.0
        if request.hold_for:
            try:
                granted = await self.api.grant_hold(request.hold_for, request.hold_lease_expires_ms)
            except Exception:  # noqa: BLE001 - no grant is the safe answer
                log.exception("grant_hold failed")
        reply = convert.host_to_pb(self.api.health())
        reply.hold_granted_s = granted
        self._observe("Health", grpc.StatusCode.OK, started)
        return reply


class GrpcHostServer:
    """Owns the grpc.aio server: bind, serve, flip health, stop with a grace period."""

    def __init__(
        self,
        api: HostApi,
        listen: str,
        *,
        max_message_bytes: int,
        credentials: grpc.ServerCredentials | None = None,
        health_listen: str = "",
        observer: CallObserver | None = None,
        policy: PolicyFile | None = None,
    ) -> None:
        """``credentials``: TLS (tls.server_credentials), else plain text. ``health_listen``: an extra
        plain-text port serving grpc.health.v1 only, for probes that cannot present a client
        certificate (the kubelet's). ``observer`` sees every answered call (metrics). ``policy``: what each
        client identity may do (base/authz.py; needs TLS); None = every caller may do everything."""
        if policy is not None and credentials is None:
            raise ValueError("an authorization policy needs TLS credentials: without them there is no identity")
        self._api = api
        self._listen = listen
        self._max_message_bytes = max_message_bytes
        self._credentials = credentials
        self._health_listen = health_listen
        self._observer = observer
        self._policy = policy
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self.port = 0
        self.health_port = 0

    async def start(self, *, serving: bool = True) -> int:
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
        pb_grpc.add_AgentHostServiceServicer_to_server(_Servicer(self._api, self._observer, self._policy), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.port = _bind(server, self._listen, self._credentials, "gRPC server", "RUSTIC_AGENT_HOST_LISTEN")
        if self._health_listen:
            # A server of its own: every port of one grpc server serves every service on it.
            health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self._health, health_server)
            self.health_port = _bind(health_server, self._health_listen, None, "gRPC health server",
                                     "RUSTIC_AGENT_HOST_HEALTH_LISTEN")
            await health_server.start()
            self._health_server = health_server
        await server.start()
        self._server = server
        # A host starts NOT_SERVING and says SERVING once it is registered and can take agents.
        await self.set_serving(serving)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def stop(self, grace_s: float | None = 5.0) -> None:
        server, self._server = self._server, None
        health_server, self._health_server = self._health_server, None
        if server is not None:
            await self._health.enter_graceful_shutdown()
            await server.stop(grace_s)
        if health_server is not None:
            await health_server.stop(None)

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None, what: str,
          setting: str) -> int:
    """The bound port; OSError naming the setting when the address cannot be had.

    grpc reports a failed bind by returning 0 (older releases) or raising RuntimeError
    (newer), and names neither the cause nor the setting.
    """
    try:
        port = (server.add_insecure_port(address) if credentials is None
                else server.add_secure_port(address, credentials))
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"{what} cannot listen on {address}: the port is in use or the address is not this "
                      f"machine's; choose another with {setting}")
    return port
