"""The module allow-list: which Python modules a launch request may make a process import.

A launch request names code by string, and naming is importing: rusticai-core resolves
each name with ``importlib``, and an import runs the module's top-level code. Without a
limit, anyone who can call CreateAgent picks any module on the host's ``sys.path`` to
run. A request names modules in these places, all checked here:

* ``agent_spec.class_name`` (imported by AgentSpec validation itself, on the host too);
* ``guild_spec.agents[*].class_name`` (GuildSpec validation imports each of them);
* ``client_type`` (and ``client_properties`` values under keys ending in ``_class``,
  e.g. ExactlyOnceClient's ``tracking_store_class``);
* ``messaging_config.backend_module``;
* ``class_name`` of every dependency resolver in ``guild_spec.dependency_map`` and
  ``agent_spec.dependency_map`` (``DependencySpec.to_resolver``).

The check runs on the raw JSON dicts, *before* any pydantic model is built, because
building one is what imports. The host runs it in ``create_agent`` and the agent process
runs it again before it builds anything (defence in depth: the host passes its list to
its agents in ``ALLOWED_MODULES_ENV``).

An entry is a module prefix: ``rustic_ai.`` (or ``rustic_ai``) allows ``rustic_ai`` and
every module below it, but not ``rustic_ai_evil``; ``*`` allows any module. Names that
are not dotted Python identifiers (relative names, path tricks) are refused as invalid.
What an allowed module imports in turn is its own business: the list limits what a
*request* can choose, not what installed code does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .errors import ForbiddenModuleError, InvalidSpecError

ALLOWED_MODULES_ENV = "RUSTIC_AGENT_HOST_ALLOWED_MODULES"
DEFAULT_ALLOWED_MODULES = ("rustic_ai.",)
ANY = "*"


class ModuleAllowList:
    def __init__(self, prefixes: Iterable[str]) -> None:
        cleaned = [p.strip() for p in prefixes if p and p.strip()]
        self.any = ANY in cleaned
        self.prefixes = tuple(sorted({p.rstrip(".") for p in cleaned if p != ANY}))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ModuleAllowList:
        """The list an agent process enforces: its host's, else the secure default."""
        raw = (os.environ if environ is None else environ).get(ALLOWED_MODULES_ENV)
        if raw is None or not raw.strip():
            return cls(DEFAULT_ALLOWED_MODULES)
        return cls(raw.split(","))

    def to_env(self) -> str:
        return ",".join(([ANY] if self.any else []) + [p + "." for p in self.prefixes])

    def __repr__(self) -> str:
        return f"ModuleAllowList({self.to_env()!r})"

    def allows(self, module: str) -> bool:
        return self.any or any(module == p or module.startswith(p + ".") for p in self.prefixes)

    def check_module(self, module: str, where: str) -> None:
        if not _is_module_path(module):
            raise InvalidSpecError(f"{where}: {module!r} is not a Python module path")
        if not self.allows(module):
            raise ForbiddenModuleError(
                # The list itself is not echoed to callers; operators read it from the host's settings.
                f"{where} names module {module!r}, which is outside this host's module allow-list "
                f"(RUSTIC_AGENT_HOST_ALLOWED_MODULES)"
            )

    def check_class(self, qualified_name: Any, where: str) -> None:
        if not isinstance(qualified_name, str):
            raise InvalidSpecError(f"{where} must be a string, got {type(qualified_name).__name__}")
        module, dot, name = qualified_name.strip().rpartition(".")
        if not dot or not module or not name.isidentifier():
            raise InvalidSpecError(f"{where}: {qualified_name!r} is not a qualified class name (module.Class)")
        self.check_module(module, where)

    def check_request(
        self,
        *,
        guild_spec: Any,
        agent_spec: Any,
        messaging_config: Any,
        client_type: Any = None,
        client_properties: Any = None,
    ) -> None:
        """Raises ForbiddenModuleError (or InvalidSpecError) naming the first module not allowed.

        Takes the raw JSON values; anything of the wrong shape is left for spec validation,
        which cannot import from it (there is no name to import).
        """
        for where, name in _class_names(guild_spec, agent_spec, client_type, client_properties):
            self.check_class(name, where)
        if isinstance(messaging_config, dict) and "backend_module" in messaging_config:
            backend = messaging_config["backend_module"]
            if not isinstance(backend, str):
                raise InvalidSpecError("messaging_config.backend_module must be a string")
            self.check_module(backend.strip(), "messaging_config.backend_module")

    def check_launch(self, request: Any) -> None:
        """``check_request`` on a LaunchRequest (its specs are still plain dicts)."""
        self.check_request(
            guild_spec=request.guild_spec,
            agent_spec=request.agent_spec,
            messaging_config=request.messaging_config,
            client_type=request.client_type,
            client_properties=request.client_properties,
        )


def _is_module_path(module: str) -> bool:
    return bool(module) and all(part.isidentifier() for part in module.split("."))


def _dependency_classes(deps: Any, where: str) -> Iterator[tuple[str, Any]]:
    if isinstance(deps, dict):
        for dep_name, dep in deps.items():
            if isinstance(dep, dict) and "class_name" in dep:
                yield f"{where}[{dep_name!r}].class_name", dep["class_name"]


def _class_names(guild_spec: Any, agent_spec: Any, client_type: Any, client_properties: Any
                 ) -> Iterator[tuple[str, Any]]:
    if isinstance(agent_spec, dict):
        if "class_name" in agent_spec:
            yield "agent_spec.class_name", agent_spec["class_name"]
        yield from _dependency_classes(agent_spec.get("dependency_map"), "agent_spec.dependency_map")
    if isinstance(guild_spec, dict):
        yield from _dependency_classes(guild_spec.get("dependency_map"), "guild_spec.dependency_map")
        agents = guild_spec.get("agents")
        if isinstance(agents, list):
            for i, spec in enumerate(agents):
                if isinstance(spec, dict) and "class_name" in spec:
                    yield f"guild_spec.agents[{i}].class_name", spec["class_name"]
                    yield from _dependency_classes(spec.get("dependency_map"), f"guild_spec.agents[{i}].dependency_map")
    if client_type:
        yield "client_type", client_type
    if isinstance(client_properties, dict):
        for key, value in client_properties.items():
            if isinstance(key, str) and key.endswith("_class") and isinstance(value, str):
                yield f"client_properties[{key!r}]", value
