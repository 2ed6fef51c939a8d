"""Validation of launch requests.

Two depths, on purpose:

* ``summarize_launch`` — on the host. The shape only: ids, names, a class name that is a
  dotted path, a messaging config. It imports nothing. rusticai-core's ``AgentSpec`` (and
  ``GuildSpec``, which holds agent specs) import the agent's class while validating, and an
  import runs arbitrary module code — seconds of it for heavy ML libraries — which on the
  host's event loop would stall every RPC and the lease with it.
* ``parse_launch`` — in the agent process (process/child.py), with rusticai-core's own
  pydantic models; a failure there is reported back as ``invalid_spec`` and answered with
  the same INVALID_ARGUMENT as a shape error on the host.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from pydantic import ValidationError

from rustic_ai.core.guild.dsl import AgentSpec, GuildSpec
from rustic_ai.core.messaging import MessagingConfig

from .errors import InvalidSpecError
from .models import LaunchRequest


@dataclasses.dataclass(frozen=True)
class ParsedLaunch:
    request: LaunchRequest
    guild_spec: GuildSpec
    agent_spec: AgentSpec
    messaging_config: MessagingConfig


def _loads_object(raw: bytes | str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidSpecError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidSpecError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def build_launch_request(
    *,
    guild_spec_json: bytes | str,
    agent_spec_json: bytes | str,
    messaging_config_json: bytes | str,
    machine_id: int = 0,
    client_type: str = "",
    client_properties_json: bytes | str = b"",
    organization_id: str = "",
    default_topic: str = "",
    restart_policy_json: bytes | str = b"",
    trace_context: dict[str, str] | None = None,
    placement_json: bytes | str = b"",
) -> LaunchRequest:
    """Builds a request from wire fields, with an error that names the bad field."""
    props = _loads_object(client_properties_json, "client_properties_json") if client_properties_json else {}
    restart = _loads_object(restart_policy_json, "restart_policy_json") if restart_policy_json else None
    if restart is not None:
        from .restart import RestartPolicy

        try:
            restart = RestartPolicy.model_validate(restart).model_dump()
        except ValidationError as exc:
            raise InvalidSpecError(f"invalid restart policy: {_short(exc)}") from None
    fields: dict[str, Any] = {
        "guild_spec": _loads_object(guild_spec_json, "guild_spec_json"),
        "agent_spec": _loads_object(agent_spec_json, "agent_spec_json"),
        "messaging_config": _loads_object(messaging_config_json, "messaging_config_json"),
        "machine_id": machine_id,
        "client_properties": props,
        "organization_id": organization_id,
        "restart": restart,
        "trace_context": dict(trace_context or {}),
    }
    if placement_json:
        from .resources import PlacementPolicy

        fields["placement"] = PlacementPolicy.from_dict(_loads_object(placement_json, "placement_json")).to_dict()
    if client_type:
        fields["client_type"] = client_type
    if default_topic:
        fields["default_topic"] = default_topic
    try:
        return LaunchRequest(**fields)
    except ValidationError as exc:
        raise InvalidSpecError(f"invalid launch request: {_short(exc)}") from None


@dataclasses.dataclass(frozen=True)
class LaunchSummary:
    """What the host needs of a launch request, read without importing anything."""

    guild_id: str
    agent_id: str
    name: str
    class_name: str
    spec_json: str


# Messaging backends whose messages never leave the process that holds them: an agent in a
# host's process would hear nobody and be heard by nobody (docs/messaging.md).
# rusticai-core exports its in-memory backend from several of its modules (GuildBuilder's
# default names rustic_ai.core.messaging.backend).
PROCESS_LOCAL_BACKENDS = frozenset({("rustic_ai.core", "InMemoryMessagingBackend")})


def _process_local(messaging_config: dict[str, Any]) -> bool:
    module, cls = messaging_config.get("backend_module", ""), messaging_config.get("backend_class")
    return any((module == package or module.startswith(package + ".")) and cls == name
               for package, name in PROCESS_LOCAL_BACKENDS)


def _dotted(name: object) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= 512 and "." in name
            and all(part.isidentifier() for part in name.split(".")))


def summarize_launch(request: LaunchRequest) -> LaunchSummary:
    """Checks a request's shape without importing any class it names; raises InvalidSpecError."""
    guild, agent = request.guild_spec, request.agent_spec
    guild_id, agent_id = guild.get("id"), agent.get("id")
    if not isinstance(guild_id, str) or not guild_id:
        raise InvalidSpecError("invalid guild spec: id must be a non-empty string")
    if not isinstance(agent_id, str) or not agent_id:
        raise InvalidSpecError("invalid agent spec: id must be a non-empty string")
    name = agent.get("name", "")
    if not isinstance(name, str):
        raise InvalidSpecError("invalid agent spec: name must be a string")
    class_name = agent.get("class_name")
    if not _dotted(class_name):
        raise InvalidSpecError(f"invalid agent spec: class_name {class_name!r} is not a dotted path module.Class")
    if not _dotted(request.client_type):
        raise InvalidSpecError(f"invalid launch request: client_type {request.client_type!r} is not a dotted path")
    try:
        MessagingConfig.model_validate(request.messaging_config)  # plain fields: imports nothing
    except (ValidationError, ValueError, TypeError) as exc:
        raise InvalidSpecError(f"invalid messaging config: {_short(exc)}") from None
    if _process_local(request.messaging_config):
        raise InvalidSpecError(
            f"messaging backend {request.messaging_config['backend_class']} keeps messages inside one process: "
            "an agent on a host could not reach the rest of its guild; use a backend with a server every host "
            "reaches (rusticai-redis's RedisMessagingBackend, rusticai-nats's NATSMessagingBackend)")
    return LaunchSummary(guild_id, agent_id, name, str(class_name), json.dumps(agent, separators=(",", ":")))


def parse_launch(request: LaunchRequest) -> ParsedLaunch:
    """Validates the three specs; raises InvalidSpecError naming the spec that failed."""
    try:
        guild_spec = GuildSpec.model_validate(request.guild_spec)
    except (ValidationError, ValueError, TypeError) as exc:
        raise InvalidSpecError(f"invalid guild spec: {_short(exc)}") from None
    try:
        agent_spec = AgentSpec.model_validate(request.agent_spec)
    except (ValidationError, ValueError, TypeError) as exc:
        raise InvalidSpecError(f"invalid agent spec: {_short(exc)}") from None
    try:
        messaging_config = MessagingConfig.model_validate(request.messaging_config)
    except (ValidationError, ValueError, TypeError) as exc:
        raise InvalidSpecError(f"invalid messaging config: {_short(exc)}") from None
    if not agent_spec.id:
        raise InvalidSpecError("invalid agent spec: id is empty")
    if not guild_spec.id:
        raise InvalidSpecError("invalid guild spec: id is empty")
    return ParsedLaunch(request, guild_spec, agent_spec, messaging_config)


def launch_request_from_models(
    guild_spec: GuildSpec,
    agent_spec: AgentSpec,
    messaging_config: MessagingConfig,
    *,
    machine_id: int = 0,
    client_type: str = "rustic_ai.core.messaging.SimpleClient",
    client_properties: dict[str, Any] | None = None,
    organization_id: str = "",
    default_topic: str = "default_topic",
) -> LaunchRequest:
    """The engine side: turns rusticai-core models into a JSON-only request."""
    return LaunchRequest(
        guild_spec=json.loads(guild_spec.model_dump_json()),
        agent_spec=json.loads(agent_spec.model_dump_json()),
        messaging_config=json.loads(messaging_config.model_dump_json()),
        machine_id=machine_id,
        client_type=client_type,
        client_properties=dict(client_properties or {}),
        organization_id=organization_id,
        default_topic=default_topic,
    )


def _short(exc: Exception, limit: int = 600) -> str:
    text = str(exc).replace("\n", "; ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
