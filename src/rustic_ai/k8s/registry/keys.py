"""Every Redis key name the project uses, in one place.

Layout (``p`` is the fleet's key prefix, ids are percent-encoded so ``:`` in an id
cannot make two keys collide):

    p:hosts                      SET   advertised addresses of hosts that registered
    p:hosts:meta                 HASH  "addr|since" -> sequence at first registration, "addr|renewed" ->
                                       "ms hold_ms seq" of the last renewal, "|seq" the counter
                                       (read by the reaper, see scripts.HEARTBEAT and REAP_HOSTS)
    p:host:{addr}                HASH  HostRecord; TTL = host lease
    p:host:{addr}:agents         SET   "guild\\x1fagent" members placed on that host (load = SCARD)
    p:host:{addr}:adopting       LIST  orphans that host has taken off p:orphans and not yet acked
    p:host:{addr}:alloc          HASH  "guild\x1fagent" -> allocation JSON of each agent holding resources there
                                       (base/resources.py; the host's usage is its sum, see scripts._ALLOC_LUA)
    p:agent:{guild}:{agent}      HASH  AgentRecord with the full AgentSpec JSON; TTL = agent TTL
    p:guild:{guild}:agents       SET   agent ids of the guild (membership without SCAN)
    p:desired:{guild}            HASH  agent id -> LaunchRequest JSON the engine wants running
    p:orphans                    LIST  "guild\x1fagent" members to place again (dead or draining host)
    p:epoch                      STRING a random id the first engine keeper writes: a different one (or none)
                                       means Redis lost its data since (engine/keeper.py)
    p:keeper:missing             HASH  "guild\x1fagent" -> Redis ms when a keeper first found an agent it
                                       launched with no record, not queued and its host without a lease
    p:unplaced                   HASH  "guild\x1fagent" -> JSON {reason, host, at}: a wanted agent no host could
                                       fit when it was to be placed again; cleared by its claim or its stop

The host hash also carries ``inventory`` (HostInventory JSON: CPUs, memory, GPU devices,
custom resources), ``labels`` (JSON object) and ``used`` (the cached sum of its alloc hash);
an agent hash carries ``alloc`` (its allocation JSON) and ``host_alloc`` (the alloc hash it
is counted in).

The orphan queue is a reliable queue: a pop moves members from p:orphans into the popping
host's p:host:{addr}:adopting list in the same script, and only an ack (or a requeue, back
to p:orphans in the same step) removes them. A pop whose reply was lost returns them again;
a host that dies or drains before acking has its adopting list pushed back onto p:orphans
(by the reaper, or by its own remove_host).

Agent ids repeat across guilds (the conformance suite reuses "initiator"), so every
agent key carries its guild.
"""

from __future__ import annotations

from urllib.parse import quote

from ..base.models import AgentKey

MEMBER_SEP = "\x1f"


def _enc(value: str) -> str:
    return quote(value, safe="")


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    @property
    def hosts(self) -> str:
        return f"{self.prefix}:hosts"

    @property
    def hosts_meta(self) -> str:
        return f"{self.prefix}:hosts:meta"

    def host(self, address: str) -> str:
        return f"{self.prefix}:host:{_enc(address)}"

    def host_agents(self, address: str) -> str:
        return f"{self.prefix}:host:{_enc(address)}:agents"

    def host_alloc(self, address: str) -> str:
        """Must stay ``host(address) + ":alloc"``: scripts derive it from the host hash's name."""
        return f"{self.host(address)}:alloc"

    @property
    def unplaced(self) -> str:
        return f"{self.prefix}:unplaced"

    def host_adopting(self, address: str) -> str:
        return f"{self.prefix}:host:{_enc(address)}:adopting"

    def agent(self, key: AgentKey) -> str:
        return f"{self.prefix}:agent:{_enc(key.guild_id)}:{_enc(key.agent_id)}"

    def agent_prefix(self, guild_id: str) -> str:
        """Lua scripts append the encoded agent id to this."""
        return f"{self.prefix}:agent:{_enc(guild_id)}:"

    def guild_agents(self, guild_id: str) -> str:
        return f"{self.prefix}:guild:{_enc(guild_id)}:agents"

    @property
    def orphans(self) -> str:
        return f"{self.prefix}:orphans"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}:epoch"

    @property
    def keeper_missing(self) -> str:
        return f"{self.prefix}:keeper:missing"

    def desired(self, guild_id: str) -> str:
        return f"{self.prefix}:desired:{_enc(guild_id)}"

    @staticmethod
    def member(key: AgentKey) -> str:
        return f"{key.guild_id}{MEMBER_SEP}{key.agent_id}"

    @staticmethod
    def parse_member(member: str) -> AgentKey:
        guild_id, _, agent_id = member.partition(MEMBER_SEP)
        return AgentKey(guild_id, agent_id)

    def agent_key_of_member(self, member: str) -> str:
        return self.agent(self.parse_member(member))
