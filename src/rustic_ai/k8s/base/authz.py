"""Authorization by client identity: which certificate may do what on an agent host.

Mutual TLS says a caller holds a certificate from the hosts' client CA; this says what
that certificate may do. A policy is a JSON file (``RUSTIC_AGENT_HOST_AUTHZ_POLICY_FILE``):

    {"rules": [
      {"identities": ["rustic-engine", "spiffe://cluster.local/ns/rustic-ai/sa/*"],
       "allow": ["launch", "stop", "read"],
       "guilds": ["*"],
       "modules": ["rustic_ai."]},
      {"identities": ["dashboard"], "allow": ["read"]}
    ]}

* ``identities``: fnmatch patterns (case-sensitive), matched against the client
  certificate's subject CN and each of its subject alternative names (DNS names, URIs
  such as SPIFFE ids, as gRPC reports them). Required.
* ``allow``: a subset of ``read`` (GetAgentInfo, ListAgents), ``launch`` (CreateAgent),
  ``stop`` (StopAgent). Required. Health is always allowed: peers ask each other for holds
  with it and probes call it.
* ``guilds``: fnmatch patterns over guild ids; default ``["*"]``.
* ``modules``: prefixes of the agent class's module a ``launch`` may name, with the
  allow-list's meaning (``rustic_ai.`` = ``rustic_ai`` and below; ``*`` = any); default
  ``["*"]``. It narrows, never widens, the host's own allow-list
  (RUSTIC_AGENT_HOST_ALLOWED_MODULES), which every request must pass as well.

A call is allowed when one rule names the caller, allows the action, matches the guild
and, for a launch, the agent class's module. Anything else is refused with
``NotAuthorizedError`` (PERMISSION_DENIED) naming the identity and what was refused. A
ListAgents over every guild is answered with the guilds the caller may read.

``PolicyFile`` re-reads the file when it changes (a ConfigMap update swaps a symlink),
looking at most once a second; a changed file that does not parse keeps the policy in
force and logs an error, as a half-written TLS rotation keeps the old certificate. At
start-up a bad file is a ConfigError: the host does not start.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .allowlist import ModuleAllowList
from .errors import ConfigError, NotAuthorizedError

log = logging.getLogger(__name__)

POLICY_FILE_ENV = "RUSTIC_AGENT_HOST_AUTHZ_POLICY_FILE"
ACTIONS = ("read", "launch", "stop")
_RULE_KEYS = {"identities", "allow", "guilds", "modules"}
CHECK_EVERY_S = 1.0  # how often PolicyFile looks at the file's stamp


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who a caller is, from its client certificate."""

    common_name: str = ""
    alt_names: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return ((self.common_name,) if self.common_name else ()) + self.alt_names

    def __str__(self) -> str:
        parts = [f"CN={self.common_name}"] if self.common_name else []
        if self.alt_names:
            parts.append("SAN=" + ",".join(self.alt_names))
        return f"client certificate {' '.join(parts) or '(no names)'}"


@dataclasses.dataclass(frozen=True)
class Rule:
    identities: tuple[str, ...]
    allow: frozenset[str]
    guilds: tuple[str, ...] = ("*",)
    modules: ModuleAllowList = dataclasses.field(default_factory=lambda: ModuleAllowList(["*"]))

    def names(self, who: Identity) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.identities for name in who.names)

    def covers_guild(self, guild_id: str) -> bool:
        return any(fnmatch.fnmatchcase(guild_id, pattern) for pattern in self.guilds)


class Policy:
    """The rules, and the one decision: may this identity do this?"""

    def __init__(self, rules: Sequence[Rule], source: str = "") -> None:
        self.rules = tuple(rules)
        self.source = source

    @classmethod
    def parse(cls, data: Any, source: str = "policy") -> Policy:
        """From the decoded JSON; raises ConfigError naming the first thing wrong."""
        if not isinstance(data, dict) or set(data) != {"rules"} or not isinstance(data["rules"], list):
            raise ConfigError(f'{source}: must be a JSON object {{"rules": [...]}} and nothing else')
        return cls([_rule(raw, f"{source}: rules[{i}]") for i, raw in enumerate(data["rules"])], source)

    @classmethod
    def load(cls, path: str) -> Policy:
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"{POLICY_FILE_ENV}={path!r} cannot be read: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{POLICY_FILE_ENV}={path!r} is not valid JSON: {exc}") from None
        return cls.parse(data, f"{POLICY_FILE_ENV}={path!r}")

    def check(self, who: Identity, action: str, guild_id: str, agent_class: str = "") -> None:
        """Raises NotAuthorizedError unless a rule allows ``action`` in ``guild_id`` (and, to launch, the class)."""
        where = [r for r in self._acting(who, action) if r.covers_guild(guild_id)]
        if not where:
            raise NotAuthorizedError(f"{who} may not {action} in guild {guild_id!r}")
        if action == "launch":
            module = agent_class.rpartition(".")[0]
            if not any(r.modules.allows(module) for r in where):
                raise NotAuthorizedError(
                    f"{who} may not launch agent class {agent_class!r} in guild {guild_id!r} "
                    "(its module is outside the prefixes the policy allows it)"
                )

    def check_action(self, who: Identity, action: str) -> None:
        """Raises NotAuthorizedError unless some rule lets ``who`` do ``action`` somewhere (checked before a
        request is even decoded, so a caller without the right learns nothing from its parse errors)."""
        self._acting(who, action)

    def readable_guilds(self, who: Identity) -> Callable[[str], bool]:
        """A predicate over the guild ids this identity may read (a listing of every guild shows those);
        NotAuthorizedError if it may read none."""
        rules = self._acting(who, "read")
        return lambda guild_id: any(r.covers_guild(guild_id) for r in rules)

    def _acting(self, who: Identity, action: str) -> list[Rule]:
        named = [r for r in self.rules if r.names(who)]
        if not named:
            raise NotAuthorizedError(f"{who} is not named in this host's authorization policy: {action} refused")
        acting = [r for r in named if action in r.allow]
        if not acting:
            raise NotAuthorizedError(f"{who} may not {action} (no rule of the policy allows it to)")
        return acting


def _strings(raw: Any, where: str, *, required: bool) -> tuple[str, ...]:
    if raw is None and not required:
        return ("*",)
    if not isinstance(raw, list) or not raw or not all(isinstance(s, str) and s.strip() for s in raw):
        raise ConfigError(f"{where} must be a non-empty list of non-empty strings")
    return tuple(s.strip() for s in raw)


def _rule(raw: Any, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise ConfigError(f"{where} has unknown keys {sorted(unknown)} (known: {sorted(_RULE_KEYS)})")
    identities = _strings(raw.get("identities"), f"{where}.identities", required=True)
    allow = _strings(raw.get("allow"), f"{where}.allow", required=True)
    bad = sorted(set(allow) - set(ACTIONS))
    if bad:
        raise ConfigError(f"{where}.allow has unknown actions {bad} (known: {list(ACTIONS)})")
    guilds = _strings(raw.get("guilds"), f"{where}.guilds", required=False)
    modules = _strings(raw.get("modules"), f"{where}.modules", required=False)
    return Rule(identities, frozenset(allow), guilds, ModuleAllowList(modules))


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class PolicyFile:
    """The policy in force, re-read when its file changes; ``current()`` is cheap enough for every call."""

    def __init__(self, path: str, *, check_every_s: float = CHECK_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._check_every_s = check_every_s
        self._clock = clock
        self._stamp = _stamp(path)
        self._policy = Policy.load(path)  # a bad file at start-up is a ConfigError
        self._checked = clock()
        self.reloads = 0

    def current(self) -> Policy:
        now = self._clock()
        if now - self._checked < self._check_every_s:
            return self._policy
        self._checked = now
        stamp = _stamp(self.path)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._policy = Policy.load(self.path)
            except ConfigError as exc:
                log.error("authorization policy changed but cannot be used, keeping the one in force: %s", exc)
            else:
                self.reloads += 1
                log.info("authorization policy reloaded from %s (%d rules)", self.path, len(self._policy.rules))
        return self._policy


def describe_rules(rules: Iterable[Rule]) -> str:
    """One line per rule, for the host's start-up log."""
    return "; ".join(f"{'|'.join(r.identities)} -> {','.join(sorted(r.allow))} in {'|'.join(r.guilds)}"
                     for r in rules)
