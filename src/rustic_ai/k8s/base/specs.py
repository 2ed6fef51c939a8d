"""Validation of launch requests with rusticai-core's own pydantic models.

Runs on the host (to answer INVALID_ARGUMENT before a process is spent) and again in the
agent process, which rebuilds the real objects from the same JSON.
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
    if client_type:
        fields["client_type"] = client_type
    if default_topic:
        fields["default_topic"] = default_topic
    try:
        return LaunchRequest(**fields)
    except ValidationError as exc:
        raise InvalidSpecError(f"invalid launch request: {_short(exc)}") from None


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
