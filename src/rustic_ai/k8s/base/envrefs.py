"""References to the host's environment in a messaging config: secrets that never enter a request.

A launch request carries the guild's messaging config, and the engine keeps every request
in Redis (the desired state) so that any host can start the agent again. A password in
``backend_config`` would therefore sit in Redis, in every host's memory and in the agent's
own logs. Instead a value may be a reference::

    "backend_config": {"redis_client": {"host": "redis", "port": 6379,
                                        "password": "${env:RUSTIC_SECRET_MESSAGING_PASSWORD}"}}

The agent process replaces each reference with the variable's value from its own
environment (its host's: set the variable on the host pods from a Secret) just before it
builds the messaging backend. Requests, the desired state and listings keep the
reference. Rules, kept small on purpose:

* only a whole string value is a reference (no interpolation inside a longer string);
* only variables named ``RUSTIC_SECRET_*`` may be referenced: whoever may launch chooses
  the messaging server too, so a reference would hand the variable's value to that
  server, and the host's own credentials (RUSTIC_K8S_REDIS_PASSWORD, ...) must not be
  reachable that way;
* a reference to a variable that is not set, or not allowed, is a bad spec
  (INVALID_ARGUMENT) naming the variable, checked on the host before anything starts.

Resolved values are secrets: the host masks them (and literal passwords) in the agent
output it keeps (base/redact.py ``messaging_secrets``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from .errors import InvalidSpecError

SECRET_ENV_PREFIX = "RUSTIC_SECRET_"
_REFERENCE = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


def reference(value: Any) -> str | None:
    """The variable ``value`` refers to, if it is a reference ``${env:NAME}``."""
    if isinstance(value, str):
        match = _REFERENCE.fullmatch(value.strip())
        if match:
            return match.group(1)
    return None


def _lookup(name: str, environ: Mapping[str, str], where: str) -> str:
    if not name.startswith(SECRET_ENV_PREFIX):
        raise InvalidSpecError(f"{where} refers to ${{env:{name}}}: only variables named {SECRET_ENV_PREFIX}* "
                               "may be referenced")
    if name not in environ:
        raise InvalidSpecError(f"{where} refers to ${{env:{name}}}, which is not set on this host")
    return environ[name]


def _walk(value: Any, where: str) -> Iterator[tuple[str, Any]]:
    yield where, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, f"{where}[{i}]")


def check_references(messaging_config: Any, environ: Mapping[str, str]) -> None:
    """Raises InvalidSpecError for a reference this host cannot resolve (the host's check, before launching)."""
    if isinstance(messaging_config, dict):
        for where, value in _walk(messaging_config.get("backend_config"), "messaging_config.backend_config"):
            name = reference(value)
            if name is not None:
                _lookup(name, environ, where)


def resolve_references(messaging_config: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """A copy of the messaging config with every reference in ``backend_config`` replaced by its value."""

    def resolve(value: Any, where: str) -> Any:
        name = reference(value)
        if name is not None:
            return _lookup(name, environ, where)
        if isinstance(value, dict):
            return {k: resolve(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    if "backend_config" not in messaging_config:
        return messaging_config
    return {**messaging_config,
            "backend_config": resolve(messaging_config["backend_config"], "messaging_config.backend_config")}


def referenced_values(messaging_config: Any, environ: Mapping[str, str]) -> list[str]:
    """The values of the (allowed, set) variables a messaging config refers to."""
    if not isinstance(messaging_config, dict):
        return []
    out = []
    for _, value in _walk(messaging_config.get("backend_config"), ""):
        name = reference(value)
        if name is not None and name.startswith(SECRET_ENV_PREFIX) and environ.get(name):
            out.append(environ[name])
    return out
