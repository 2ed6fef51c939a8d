"""The location registry: where each agent runs and which hosts are alive, in Redis.

The only module that talks to Redis. Liveness is a TTL: a host renews its own lease and
the TTL of every agent it runs in one scripted round trip (`heartbeat`); an entry that is
not renewed disappears by itself. Reads never SCAN: guild membership and host load live
in sets. Every Redis failure surfaces as `RegistryUnavailableError`, so callers can tell
"Redis is down" from "the agent is not there".
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Self

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from ..base.errors import RegistryUnavailableError
from ..base.redact import redact_text, redact_url, url_password
from ..base.models import AgentKey, AgentRecord, AgentState, HostRecord, HostState, LaunchRequest
from ..base.resources import HostInventory, Usage
from . import scripts
from .keys import Keys

log = logging.getLogger(__name__)

_REDIS_DOWN = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)


@dataclasses.dataclass(frozen=True)
class HeartbeatResult:
    missing: list[AgentKey]  # not in Redis any more: re-register them
    lost: list[AgentKey]  # another host owns them now: stop our copy
    host_was_missing: bool  # our own entry had gone (lease expired or Redis restarted empty)
    drain_requested: str = ""  # an operator asked this host to drain (`rustic-k8s drain`)
    peers: tuple[str, ...] = ()  # other hosts whose lease is current
    redis_ms: int = 0  # Redis's own clock when it renewed the lease (ms since the epoch)


NOT_DESIRED = "not desired"
OWNED_ELSEWHERE = "owned by another live host"
SHORT = "does not fit"


@dataclasses.dataclass(frozen=True)
class ClaimResult:
    ok: bool
    owner: str = ""  # the host that owns the agent, when refused for that
    reason: str = ""  # why not ok: OWNED_ELSEWHERE, NOT_DESIRED or SHORT
    allocation: str = ""  # ok: what the agent holds on the host (Allocation JSON; "" = a slot only)
    short: tuple[str, int, int] | None = None  # SHORT: (resource, needed, largest free), resources.py units


@dataclasses.dataclass(frozen=True)
class Kept:
    """What the keeper script found (and did) for one agent; see scripts.KEEP_AGENTS."""

    key: AgentKey
    status: str  # running, gone, unknown, queued, host_alive, no_adopter, missing or pushed
    owner: str = ""  # running: the host whose record it is
    restored: bool = False  # its desired entry was lost with Redis's data and is written back


@dataclasses.dataclass(frozen=True)
class KeepRound:
    epoch: str  # the data's epoch now: pass it to the next round
    wait_s: float  # how long an agent must stay missing before it is queued (the hosts' lease + margin)
    agents: list[Kept]


@dataclasses.dataclass(frozen=True)
class Unplaced:
    """A wanted agent that no host could fit when it was to be placed again."""

    key: AgentKey
    reason: str
    host: str  # the last host that tried
    at: float  # unix seconds


def _record_fields(record: AgentRecord) -> list[str]:
    fields = {
        "guild_id": record.guild_id,
        "agent_id": record.agent_id,
        "name": record.name,
        "class_name": record.class_name,
        "spec": record.spec_json,
        "host": record.host,
        "pid": str(record.pid),
        "state": str(record.state),
        "started_at": repr(record.started_at),
        "restarts": str(record.restarts),
        "reason": record.reason,
        "exit_code": "" if record.exit_code is None else str(record.exit_code),
    }  # "alloc" is written by the claim script itself
    return [item for pair in fields.items() for item in pair]


def _record_from_hash(h: dict[str, str]) -> AgentRecord:
    exit_code = h.get("exit_code", "")
    return AgentRecord(
        guild_id=h.get("guild_id", ""),
        agent_id=h.get("agent_id", ""),
        name=h.get("name", ""),
        class_name=h.get("class_name", ""),
        spec_json=h.get("spec", ""),
        host=h.get("host", ""),
        pid=int(h.get("pid") or 0),
        state=AgentState(h.get("state") or AgentState.STARTING),
        started_at=float(h.get("started_at") or 0.0),
        restarts=int(h.get("restarts") or 0),
        reason=h.get("reason", ""),
        exit_code=int(exit_code) if exit_code else None,
        host_alive=h.get("_host_alive", "1") == "1",
        allocation=h.get("alloc", ""),
    )


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


class LocationRegistry:
    """Async client of the registry. Use as ``async with LocationRegistry(url, prefix) as reg``."""

    def __init__(
        self,
        redis_url: str,
        key_prefix: str = "rk8s",
        *,
        agent_ttl_s: float = 60.0,
        lease_s: float = 5.0,
        socket_timeout_s: float = 5.0,
        username: str = "",
        password: str = "",
        ssl_ca_file: str = "",
        ssl_cert_file: str = "",
        ssl_key_file: str = "",
    ) -> None:
        """``username``/``password`` override the URL's (AUTH, ACL users); the ``ssl_*`` files apply to rediss://."""
        self.keys = Keys(key_prefix)
        self.agent_ttl_ms = int(agent_ttl_s * 1000)
        self.host_ttl_ms = int(lease_s * 1000)
        self._url = redis_url
        self._socket_timeout_s = socket_timeout_s
        self._auth: dict[str, Any] = {}
        if username:
            self._auth["username"] = username
        if password:
            self._auth["password"] = password
        if redis_url.startswith("rediss://"):
            # redis-py's names; CERT_REQUIRED is its default for rediss:// and stays so.
            self._auth.update({k: v for k, v in (("ssl_ca_certs", ssl_ca_file), ("ssl_certfile", ssl_cert_file),
                                                 ("ssl_keyfile", ssl_key_file)) if v})
        # Every message that leaves this class is scrubbed of these.
        self._secrets = tuple(filter(None, [password, url_password(redis_url)]))
        self.display_url = redact_url(redis_url)
        self._redis: aioredis.Redis | None = None

    @classmethod
    def from_settings(cls, settings: Any, **kw: Any) -> LocationRegistry:
        """From HostSettings or EngineSettings: URL, prefix, credentials and TLS files."""
        return cls(
            settings.redis_url,
            settings.key_prefix,
            username=settings.redis_username,
            password=settings.redis_password,
            ssl_ca_file=settings.redis_ca_file,
            ssl_cert_file=settings.redis_cert_file,
            ssl_key_file=settings.redis_key_file,
            **kw,
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._redis is not None:
            return
        self._redis = aioredis.Redis.from_url(
            self._url,
            decode_responses=True,
            socket_timeout=self._socket_timeout_s,
            socket_connect_timeout=self._socket_timeout_s,
            health_check_interval=15,
            # A pooled connection goes stale when Redis restarts; every operation here is
            # safe to repeat, so retry on a fresh connection instead of failing the call.
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2),
            retry_on_error=[redis_errors.ConnectionError, redis_errors.TimeoutError],
            **self._auth,
        )
        r = self._redis
        self._claim = r.register_script(scripts.CLAIM_AGENT)
        self._update = r.register_script(scripts.UPDATE_AGENT)
        self._remove = r.register_script(scripts.REMOVE_AGENT)
        self._heartbeat = r.register_script(scripts.HEARTBEAT)
        self._list_guild = r.register_script(scripts.LIST_GUILD)
        self._list_hosts = r.register_script(scripts.LIST_HOSTS)
        self._is_running = r.register_script(scripts.IS_RUNNING)
        self._reap = r.register_script(scripts.REAP_HOSTS)
        self._pop_orphans = r.register_script(scripts.POP_ORPHANS)
        self._ack_orphans = r.register_script(scripts.ACK_ORPHANS)
        self._requeue_orphans = r.register_script(scripts.REQUEUE_ORPHANS)
        self._remove_host = r.register_script(scripts.REMOVE_HOST)
        self._hand_off = r.register_script(scripts.HAND_OFF_AGENT)
        self._set_host_state = r.register_script(scripts.SET_HOST_STATE)
        self._report_unplaced = r.register_script(scripts.REPORT_UNPLACED)
        self._keep = r.register_script(scripts.KEEP_AGENTS)

    async def close(self) -> None:
        r, self._redis = self._redis, None
        if r is not None:
            await r.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("LocationRegistry used before start()")
        return self._redis

    @contextlib.asynccontextmanager
    async def _guard(self, what: str) -> AsyncIterator[None]:
        try:
            yield
        except redis_errors.AuthenticationError as exc:  # a ConnectionError too: before _REDIS_DOWN
            raise RegistryUnavailableError(
                f"Redis at {self.display_url} refused our credentials during {what}: {self._scrub(exc)}"
            ) from None
        except _REDIS_DOWN as exc:
            raise RegistryUnavailableError(f"Redis unreachable during {what}: {self._scrub(exc)}") from None
        except redis_errors.RedisError as exc:
            raise RegistryUnavailableError(f"Redis error during {what}: {self._scrub(exc)}") from None

    def _scrub(self, exc: BaseException) -> str:
        # Not chained (``from None``) either: a traceback would print the original message.
        return redact_text(str(exc), *self._secrets)

    async def ping(self) -> bool:
        async with self._guard("ping"):
            return bool(await self.redis.ping())

    # -- agents: written by hosts --------------------------------------------------------

    async def claim_agent(self, record: AgentRecord, *, exclusive: bool = True,
                          require_desired: bool = False, need: str = "", previous: str = "",
                          force: bool = False) -> ClaimResult:
        """Registers (or re-registers) an agent on ``record.host`` atomically.

        Moving an agent between hosts removes it from the old host's set in the same
        script. With ``exclusive`` an agent still owned by another live host is refused
        (``ClaimResult(False, owner, OWNED_ELSEWHERE)``). With ``require_desired`` an agent
        whose desired state (``p:desired:{guild}``) is gone is refused
        (``ClaimResult(False, "", NOT_DESIRED)``), checked in the same script: adopters pass
        it, so a stop (which clears desired state first) cannot be undone by an adopter that
        read the desired state before the stop.

        ``need`` (a ResourceRequest's JSON) is deducted from what ``record.host`` has left in
        the same script, or the claim is refused (``ClaimResult(False, reason=SHORT, short=
        (resource, needed, largest free))``, nothing changed). ``previous`` (the Allocation
        JSON the agent held here) is kept if it still fits beside the others — a restart keeps
        its devices — else a new one is chosen; with ``force`` it is taken as it is (a host
        re-registering an agent whose process runs on those devices). The result's
        ``allocation`` says what the agent holds.
        """
        k = self.keys
        async with self._guard("claim_agent"):
            res = await self._claim(
                keys=[k.agent(record.key), k.guild_agents(record.guild_id), k.host_agents(record.host),
                      k.host(record.host), k.desired(record.guild_id), k.host_alloc(record.host), k.unplaced],
                args=[self.agent_ttl_ms, k.member(record.key), record.agent_id, record.host, "1" if exclusive else "0",
                      "1" if require_desired else "0", need, previous, "1" if force else "0",
                      *_record_fields(record)],
            )
        if res[0] == "ok":
            return ClaimResult(True, allocation=res[1] if len(res) > 1 else "")
        if res[0] == "not_desired":
            return ClaimResult(False, "", NOT_DESIRED)
        if res[0] == "short":
            return ClaimResult(False, "", SHORT, short=(str(res[1]), int(float(res[2])), int(float(res[3]))))
        return ClaimResult(False, res[1], OWNED_ELSEWHERE)

    async def update_agent(self, key: AgentKey, host: str, **fields: Any) -> bool:
        """Sets fields (state, pid, exit_code, reason, restarts) while ``host`` owns the agent."""
        flat: list[str] = []
        for name, value in fields.items():
            if name == "exit_code":
                value = "" if value is None else str(value)
            flat += [name, str(value)]
        async with self._guard("update_agent"):
            return bool(await self._update(keys=[self.keys.agent(key)], args=[host, Keys.member(key), *flat]))

    async def remove_agent(self, key: AgentKey, host: str = "", *, pid: int = 0) -> bool:
        """Deletes an agent's entry, unless another host than ``host`` owns it now, or (``pid`` given)
        the entry is of another process of the agent — a later launch that must not be removed."""
        k = self.keys
        async with self._guard("remove_agent"):
            return bool(
                await self._remove(
                    keys=[k.agent(key), k.guild_agents(key.guild_id), k.host_agents(host)],
                    args=[k.member(key), key.agent_id, host, str(pid or "")],
                )
            )

    async def hand_off_agent(self, key: AgentKey, host: str) -> bool:
        """Gives an agent ``host`` has stopped (drain) to the fleet: removes its entry and
        memberships and queues it as an orphan, in one script, only while ``host`` owns it.

        True: the agent is on the orphan queue (also when an earlier attempt whose reply was
        lost did it: the client's retry answers the same). False: nothing changed — another
        host owns it now, or there is no entry (never registered, expired, Redis restarted).
        """
        k = self.keys
        async with self._guard("hand_off_agent"):
            return bool(
                await self._hand_off(
                    keys=[k.agent(key), k.guild_agents(key.guild_id), k.host_agents(host), k.orphans],
                    args=[k.member(key), key.agent_id, host],
                )
            )

    # -- hosts -----------------------------------------------------------------------------

    async def heartbeat(self, host: HostRecord, agents: Iterable[AgentKey], *, hold_max_s: float = 0.0,
                        fresh: bool = False) -> HeartbeatResult:
        """Renews the host's lease and all its agents' TTLs in one round trip.

        ``hold_max_s``: the longest this host keeps agents running through an outage after
        this renewal (host/lease.py); recorded so a reaper that this host never heard of
        waits at least that long (REAP_HOSTS). ``fresh``: the first renewal of this process
        (a restart at the same address): it counts as registering anew.
        """
        k = self.keys
        agent_list = list(agents)
        fields = {
            "address": host.address,
            "name": host.name,
            "capacity": str(host.capacity),
            "agents": str(host.agents),
            "state": str(host.state),
            "version": host.version,
            "started_at": repr(host.started_at),
            "renewed_at": repr(time.time()),
            "inventory": host.inventory.to_json(),
            "labels": json.dumps(host.labels, sort_keys=True),
            "lease_ms": str(self.host_ttl_ms),  # engines' keepers wait this long before re-queueing (KEEP_AGENTS)
        }
        flat = [item for pair in fields.items() for item in pair]
        async with self._guard("heartbeat"):
            missing, lost, existed, drain, peers, redis_ms = await self._heartbeat(
                keys=[k.host(host.address), k.hosts, k.host_agents(host.address), k.hosts_meta,
                      *(k.agent(a) for a in agent_list)],
                args=[self.host_ttl_ms, self.agent_ttl_ms, host.address, len(fields), int(hold_max_s * 1000),
                      f"{k.prefix}:host:", *flat, "1" if fresh else "0", *(k.member(a) for a in agent_list)],
            )
        return HeartbeatResult(
            missing=[agent_list[i - 1] for i in missing],
            lost=[agent_list[i - 1] for i in lost],
            host_was_missing=not existed,
            drain_requested=drain or "",
            peers=tuple(sorted(peers)),
            redis_ms=int(redis_ms),
        )

    async def remove_host(self, address: str) -> int:
        """Forgets a host (end of a drain). Orphans it popped and did not ack go back onto the
        orphan queue in the same step; returns how many did."""
        k = self.keys
        async with self._guard("remove_host"):
            return int(
                await self._remove_host(
                    keys=[k.host(address), k.host_agents(address), k.hosts, k.host_adopting(address), k.orphans,
                          k.hosts_meta],
                    args=[address],
                )
            )

    async def request_drain(self, address: str, reason: str = "requested by operator") -> bool:
        """Asks a live host to drain; it notices at its next lease renewal. False if no such host."""
        key = self.keys.host(address)
        async with self._guard("request_drain"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.exists(key)
                pipe.hsetnx(key, "drain_requested", reason or "requested")
                exists, _ = await pipe.execute()
            if not exists:
                await self.redis.delete(key)  # HSETNX created a stray hash: no such host
        return bool(exists)

    async def set_host_state(self, address: str, state: HostState) -> bool:
        """Records a live host's state; False (and nothing written) if its lease is gone."""
        async with self._guard("set_host_state"):
            return bool(await self._set_host_state(keys=[self.keys.host(address)], args=[str(state)]))

    async def list_hosts(self) -> list[HostRecord]:
        """Hosts whose lease is current, with their load read from their agent sets."""
        async with self._guard("list_hosts"):
            rows = await self._list_hosts(keys=[self.keys.hosts], args=[f"{self.keys.prefix}:host:"])
        hosts = []
        for address, flat, count in rows:
            h = _pairs(flat)
            hosts.append(
                HostRecord(
                    address=address,
                    name=h.get("name", ""),
                    capacity=int(h.get("capacity") or 0),
                    agents=int(count),
                    state=HostState(h.get("state") or HostState.SERVING),
                    version=h.get("version", ""),
                    started_at=float(h.get("started_at") or 0.0),
                    inventory=_inventory(h.get("inventory", "")),
                    usage=Usage.from_json(h.get("used", "")),
                    labels=dict(_labels(h.get("labels", ""))),
                )
            )
        return sorted(hosts, key=lambda h: h.address)

    async def host_agents(self, address: str) -> list[AgentKey]:
        async with self._guard("host_agents"):
            members = await self.redis.smembers(self.keys.host_agents(address))
        return sorted(Keys.parse_member(m) for m in members)

    # -- agents: read by engines and the CLI -------------------------------------------------

    async def get_agent(self, key: AgentKey) -> AgentRecord | None:
        async with self._guard("get_agent"):
            h = await self.redis.hgetall(self.keys.agent(key))
        return _record_from_hash(h) if h else None

    async def is_agent_running(self, key: AgentKey) -> bool:
        """Live state on a host whose lease is current; one round trip."""
        async with self._guard("is_agent_running"):
            return bool(await self._is_running(keys=[self.keys.agent(key)], args=[Keys.member(key)]))

    async def list_guild(self, guild_id: str) -> list[AgentRecord]:
        """Every agent entry of a guild (any state), in one round trip."""
        async with self._guard("list_guild"):
            rows = await self._list_guild(
                keys=[self.keys.guild_agents(guild_id)], args=[self.keys.agent_prefix(guild_id)]
            )
        return sorted((_record_from_hash(_pairs(r)) for r in rows), key=lambda r: r.agent_id)

    async def guild_size(self, guild_id: str, exclude_agent: str = "") -> int:
        """Live agents of a guild in the fleet (starting, running or restarting on a live host)."""
        return sum(1 for r in await self.list_guild(guild_id) if r.is_live and r.agent_id != exclude_agent)

    # -- desired state: written by engines ---------------------------------------------------

    async def set_desired(self, request: LaunchRequest) -> None:
        key = request.key
        async with self._guard("set_desired"):
            await self.redis.hset(self.keys.desired(key.guild_id), key.agent_id, request.model_dump_json())

    async def clear_desired(self, key: AgentKey) -> None:
        """Also forgets that the agent could not be placed (it is no longer wanted)."""
        async with self._guard("clear_desired"), self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.keys.desired(key.guild_id), key.agent_id)
            pipe.hdel(self.keys.unplaced, Keys.member(key))
            await pipe.execute()

    # -- agents nobody could fit -------------------------------------------------------------

    async def report_unplaced(self, key: AgentKey, reason: str, host: str) -> bool:
        """Records that ``host`` could not fit a wanted agent; its next claim anywhere clears it.

        Not recorded (False) when the agent is no longer wanted or runs somewhere by now."""
        entry = json.dumps({"reason": reason, "host": host, "at": time.time()})
        k = self.keys
        async with self._guard("report_unplaced"):
            return bool(await self._report_unplaced(keys=[k.agent(key), k.unplaced, k.desired(key.guild_id)],
                                                    args=[Keys.member(key), key.agent_id, entry]))

    async def list_unplaced(self) -> list[Unplaced]:
        async with self._guard("list_unplaced"):
            raw = await self.redis.hgetall(self.keys.unplaced)
        out = []
        for member, text in raw.items():
            try:
                d = json.loads(text)
            except ValueError:
                d = {}
            out.append(Unplaced(Keys.parse_member(member), str(d.get("reason", "")), str(d.get("host", "")),
                                float(d.get("at") or 0.0)))
        return sorted(out, key=lambda u: u.key)

    async def set_desired_if_missing(self, request: LaunchRequest) -> bool:
        """Restores a desired-state entry (after Redis lost it) without overwriting a newer one."""
        key = request.key
        async with self._guard("set_desired_if_missing"):
            return bool(
                await self.redis.hsetnx(self.keys.desired(key.guild_id), key.agent_id, request.model_dump_json())
            )

    async def desired_request(self, key: AgentKey) -> LaunchRequest | None:
        async with self._guard("desired_request"):
            text = await self.redis.hget(self.keys.desired(key.guild_id), key.agent_id)
        if text is None:
            return None
        try:
            return LaunchRequest.model_validate_json(text)
        except ValueError:
            log.warning("desired state of %s is not a valid launch request; ignored", key)
            return None

    async def keep_agents(self, wanted: Sequence[tuple[LaunchRequest, str]], epoch: str, *,
                          fallback_lease_s: float, margin_s: float, no_push: Iterable[AgentKey] = ()) -> KeepRound:
        """One keeper round for agents an engine launched: (request, host it last ran on) each.

        Writes back desired entries Redis lost with its data (the epoch changed since ``epoch``;
        "" = first round: nothing is written back), and queues agents that have had no record,
        no queue entry and no host with a lease for longer than the hosts' lease (each host
        records its own; ``fallback_lease_s`` when none does) plus ``margin_s``, measured on
        Redis's clock; never those in ``no_push``. One round trip (scripts.KEEP_AGENTS)."""
        k = self.keys
        keys = [k.epoch, k.orphans, k.hosts, k.keeper_missing]
        args: list[Any] = [uuid.uuid4().hex, epoch, f"{k.prefix}:host:", int(fallback_lease_s * 1000),
                           int(margin_s * 1000)]
        held = set(no_push)
        for request, host in wanted:
            key = request.key
            keys += [k.agent(key), k.desired(key.guild_id), k.host(host)]
            args += [k.member(key), key.agent_id, request.model_dump_json(), "0" if key in held else "1"]
        async with self._guard("keep_agents"):
            res = await self._keep(keys=keys, args=args)
        agents = []
        for i, (request, _host) in enumerate(wanted):
            status, owner = res[2 + 2 * i], res[3 + 2 * i]
            restored = status.startswith("restored_")
            agents.append(Kept(request.key, status.removeprefix("restored_"), owner or "", restored))
        return KeepRound(str(res[0]), int(res[1]) / 1000, agents)

    # -- orphans: agents to place again ------------------------------------------------------

    async def reap_dead_hosts(self, reaper: str, spare: Iterable[str] = (), *, sent_ms: int = 0,
                              validity_ms: int = 1000) -> list[str]:
        """Moves the agents of hosts whose lease expired, and the orphans they had popped but
        not acked, onto the orphan queue; returns the hosts reaped.

        Never reaps ``reaper`` itself nor an address in ``spare`` (hosts the caller promised
        a hold; they are reaped by a later call that no longer spares them). ``sent_ms``, a
        lower bound of Redis's clock now (host/lease.py ``redis_now_ms``), makes the call do
        nothing if Redis runs it more than ``validity_ms`` later (it waited out a pause); 0
        skips that check. A host that last renewed before ``reaper`` first registered is
        reaped only once its hold limit and a lease have passed since (scripts.REAP_HOSTS).
        Exactly one of many concurrent reapers takes each dead host. A retried call after a
        lost reply answers ``[]`` for hosts the lost attempt reaped: the list is for
        logging, the queue is what counts.
        """
        spared = [spare] if isinstance(spare, str) else list(spare)  # one address is not its characters
        k = self.keys
        async with self._guard("reap_dead_hosts"):
            return list(
                await self._reap(keys=[k.hosts, k.orphans, k.hosts_meta],
                                 args=[f"{k.prefix}:host:", reaper, int(sent_ms), int(validity_ms), self.host_ttl_ms,
                                       *spared])
            )

    async def push_orphans(self, keys: Iterable[AgentKey]) -> None:
        """Queues agents for any host to place again (appended to the tail)."""
        members = [Keys.member(k) for k in keys]
        if members:
            async with self._guard("push_orphans"):
                await self.redis.rpush(self.keys.orphans, *members)

    async def pop_orphans(self, count: int, host: str = "") -> list[AgentKey]:
        """Orphans for ``host`` to adopt: at most ``count``, each to be acked with `ack_orphans`.

        The reliable queue: members move from the orphan queue to ``host``'s adopting list in
        one script, and every call returns that whole list — orphans popped before and not yet
        acked included (a reply lost on the wire loses nothing; the client's own retry already
        answers them). A smaller ``count`` than last time gives the surplus back to the head of
        the queue, ``count <= 0`` gives everything back. If ``host`` dies or drains before
        acking, the reaper or its `remove_host` puts them back. A host whose lease is gone
        takes nothing. One caller per host, and it settles every member it got — `ack_orphans`
        (handled) or `requeue_orphans` (not now) — before it pops again; an unsettled member
        comes back in the next pop.

        Without ``host`` this is the old unreliable LPOP, kept for callers not switched yet: a
        lost reply or a death before adopting loses the batch.
        """
        if not host:
            if count <= 0:
                return []
            async with self._guard("pop_orphans"):
                members = await self.redis.lpop(self.keys.orphans, count)
            return [Keys.parse_member(m) for m in members or []]
        k = self.keys
        async with self._guard("pop_orphans"):
            members = await self._pop_orphans(keys=[k.orphans, k.host_adopting(host), k.host(host)],
                                              args=[max(count, 0)])
        # The same agent can be queued twice (a drain and a reap racing): adopt it once.
        return [Keys.parse_member(m) for m in dict.fromkeys(members)]

    async def ack_orphans(self, keys: Iterable[AgentKey], host: str) -> int:
        """Removes handled orphans from ``host``'s adopting list: adopted, no longer wanted,
        already running elsewhere, or re-queued by the caller. Returns how many entries went;
        members ``host`` did not pop are ignored. No keys: no round trip."""
        members = [Keys.member(k) for k in keys]
        if not members:
            return 0
        async with self._guard("ack_orphans"):
            return int(await self._ack_orphans(keys=[self.keys.host_adopting(host)], args=members))

    async def requeue_orphans(self, keys: Iterable[AgentKey], host: str) -> int:
        """Gives orphans ``host`` popped but cannot adopt now (full, launch failed for a
        temporary reason) back to the tail of the queue, atomically. Members ``host`` does not
        hold are not queued (a retried call cannot queue one twice). Returns how many moved;
        no keys: no round trip."""
        members = [Keys.member(k) for k in keys]
        if not members:
            return 0
        async with self._guard("requeue_orphans"):
            return int(await self._requeue_orphans(keys=[self.keys.host_adopting(host), self.keys.orphans],
                                                   args=members))

    async def desired(self, guild_id: str) -> dict[str, LaunchRequest]:
        async with self._guard("desired"):
            raw = await self.redis.hgetall(self.keys.desired(guild_id))
        out = {}
        for agent_id, text in raw.items():
            try:
                out[agent_id] = LaunchRequest.model_validate_json(text)
            except ValueError:
                log.warning("desired state of %s/%s is not a valid launch request; ignored", guild_id, agent_id)
        return out


@functools.lru_cache(maxsize=8192)
def _inventory(text: str) -> HostInventory:
    # A host's inventory is the same text on every renewal: parse each once (frozen, shared).
    return HostInventory.from_json(text)


@functools.lru_cache(maxsize=8192)
def _labels(text: str) -> dict[str, str]:
    try:
        d = json.loads(text) if text else {}
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in d.items()} if isinstance(d, dict) else {}


def spec_summary(spec_json: str) -> tuple[str, str]:
    """(name, class_name) from an AgentSpec JSON, tolerating junk."""
    try:
        d = json.loads(spec_json)
        return str(d.get("name", "")), str(d.get("class_name", ""))
    except ValueError:
        return "", ""
