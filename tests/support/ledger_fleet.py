"""A small fleet for fault tests: its own Redis, hosts, an engine, ledger agents and a checker.

Agents talk over the fleet's Redis, or over a NATS server when one is given.

Everything it starts it closes, in reverse order, even when the test fails half way
(`LedgerFleet` is an async context manager). Hosts may reach Redis through a
`CuttableProxy` of their own, so one of them can be cut off while the rest are not. Which
host runs an agent is read from /proc (the agent process's ancestors), not from the
registry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from rustic_ai.core.guild.builders import AgentBuilder
from rustic_ai.k8s import AsyncK8sEngine, EngineSettings

from .exactly_once import Checker, copy_alive
from .hosts import LOG_DIR_ENV, HostProcess, start_hosts
from .ledger_agents import LEDGER_DIR_ENV, LedgerAgent
from .nats_server import NatsServer
from .probe import guild_spec, nats_messaging, redis_messaging
from .proxy import CuttableProxy
from .redis_server import RedisServer

log = logging.getLogger(__name__)

# Short leases keep every fault short: lease 3 s, renewed every 0.4 s, agents dead 0.6 s before it lapses
# (room enough for the hosts to agree on a hold when Redis is gone for everyone).
FAST_ENV = {
    "RUSTIC_AGENT_HOST_LEASE_S": "3",
    "RUSTIC_AGENT_HOST_LEASE_RENEW_S": "0.4",
    "RUSTIC_AGENT_HOST_FENCE_MARGIN_S": "0.6",
    "RUSTIC_AGENT_HOST_RESTART_BACKOFF_S": "0.1",
    "RUSTIC_AGENT_HOST_RESTART_BACKOFF_MAX_S": "0.5",
    "RUSTIC_AGENT_HOST_MAX_RESTARTS": "1000",  # these tests are about exactly-once, not the limit
    "RUSTIC_AGENT_HOST_STOP_GRACE_S": "2",
}
LEASE_S = 3.0


def ledger_spec(agent_id: str, class_name: str | None = None):
    """A LedgerAgent's spec; ``class_name`` names a subclass by its dotted name, so the test
    process never imports it (support.slow_import_agents takes 6 s to import)."""
    spec = (AgentBuilder(LedgerAgent).set_id(agent_id).set_name(f"Ledger {agent_id}")
            .set_description("records every message it handles").build_spec())
    return spec.model_copy(update={"class_name": class_name}) if class_name else spec


@dataclasses.dataclass
class FleetHost:
    process: HostProcess
    proxy: CuttableProxy | None = None


class LedgerFleet:
    def __init__(self, *, env: dict[str, str] | None = None, rate_per_s: float = 20.0,
                 nats: NatsServer | None = None) -> None:
        self.redis = RedisServer()
        self.nats = nats  # the agents' messages go through it when given (the registry stays in Redis)
        self.prefix = f"eo{uuid.uuid4().hex[:8]}"
        # With RUSTIC_K8S_TEST_LOG_DIR (support/hosts.py) the ledgers are kept there, next to the logs.
        self.keep_dir = os.environ.get(LOG_DIR_ENV)
        if self.keep_dir:
            Path(self.keep_dir).mkdir(parents=True, exist_ok=True)
        self.ledger_dir = Path(tempfile.mkdtemp(prefix="rk8s-ledger-", dir=self.keep_dir))
        self.env = {**FAST_ENV, LEDGER_DIR_ENV: str(self.ledger_dir), **(env or {})}
        self.guild = guild_spec(f"eo-{uuid.uuid4().hex[:6]}")
        self.rate_per_s = rate_per_s
        self.hosts: list[FleetHost] = []
        self.engine: AsyncK8sEngine | None = None
        self.checker: Checker | None = None
        self._stack = contextlib.AsyncExitStack()
        self._serial = 0

    @property
    def messaging(self):
        return nats_messaging(self.nats.url) if self.nats is not None else redis_messaging(self.redis.port)

    async def __aenter__(self) -> LedgerFleet:
        self.redis.start()
        self._stack.callback(self._close_sync)
        settings = EngineSettings.from_env({}, redis_url=self.redis.url, key_prefix=self.prefix, call_timeout_s=5.0,
                                           launch_timeout_s=30.0, discovery_refresh_s=0.2)
        self.engine = await self._stack.enter_async_context(AsyncK8sEngine(settings, organization_id="test-org"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def _close_sync(self) -> None:
        # Each part closes on its own: one that fails must not leave the others running.
        steps = [self.checker.close] if self.checker is not None else []
        for h in self.hosts:
            steps.append(h.process.close)
            if h.proxy is not None:
                steps.append(h.proxy.close)
        steps.append(self.redis.close)
        if not self.keep_dir:
            steps.append(lambda: shutil.rmtree(self.ledger_dir, ignore_errors=True))
        for step in steps:
            try:
                step()
            except Exception:  # noqa: BLE001 - logged; the rest still closes
                log.exception("closing the fleet: %s failed", step)

    # -- hosts

    def start_hosts(self, n: int, *, via_proxy: bool = False) -> list[FleetHost]:
        names = [f"h{self._serial + i}" for i in range(n)]
        self._serial += n
        if not via_proxy:
            new = [FleetHost(p) for p in start_hosts(self.redis.url, self.prefix, names, env=self.env, own_group=True)]
        else:
            new = []
            for name in names:  # one proxy each: cutting one host off leaves the others connected
                proxy = CuttableProxy(self.redis.port).start()
                try:
                    [p] = start_hosts(f"redis://127.0.0.1:{proxy.port}/0", self.prefix, [name], env=self.env,
                                      own_group=True)
                except BaseException:
                    proxy.close()
                    raise
                new.append(FleetHost(p, proxy))
        self.hosts += new
        return new

    @property
    def live_hosts(self) -> list[FleetHost]:
        return [h for h in self.hosts if h.process.proc.poll() is None]

    def logs(self) -> str:
        return "\n".join(f"=== {h.process.name} ({h.process.address}, pid {h.process.pid}) ===\n{h.process.logs()}"
                         for h in self.hosts)

    # -- agents

    def request(self, agent_id: str, class_name: str | None = None):
        assert self.engine is not None
        return self.engine.build_request(self.guild, ledger_spec(agent_id, class_name), self.messaging)

    async def launch(self, agent_ids: list[str], class_name: str | None = None) -> list:
        assert self.engine is not None
        results = await self.engine.launch_many([self.request(a, class_name) for a in agent_ids])
        bad = [r for r in results if isinstance(r, BaseException)]
        assert not bad, f"launch failed: {bad}\n{self.logs()}"
        return results

    def start_checker(self, agents: list[str]) -> Checker:
        self.checker = Checker(self.ledger_dir, self.guild.id, self.messaging, agents, rate_per_s=self.rate_per_s)
        self.checker.start()
        return self.checker

    def live_pids(self, agent_id: str) -> list[int]:
        """Live copies of the agent, from its ledger and /proc."""
        assert self.checker is not None
        self.checker.sample()
        entry = self.checker.ledgers.agents.get(agent_id)
        return [c.pid for c in entry.copies if copy_alive(c)] if entry else []

    def hosts_of(self, agent_id: str) -> list[FleetHost]:
        """The live hosts whose process trees hold live copies of the agent (by /proc parent links)."""
        hosts = {h.process.pid: h for h in self.live_hosts}
        found = []
        for pid in self.live_pids(agent_id):
            with contextlib.suppress(OSError, IndexError, ValueError):  # it may exit while we look
                while pid > 1 and pid not in hosts:
                    pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if pid in hosts:
                    found.append(hosts[pid])
        return found

    def host_of(self, agent_id: str) -> FleetHost:
        """The host running the agent's one live copy."""
        found = self.hosts_of(agent_id)
        assert len(found) == 1, f"{agent_id}: live copies {self.live_pids(agent_id)} on hosts " \
                                f"{[h.process.name for h in found]}"
        return found[0]


@contextlib.asynccontextmanager
async def fleet_under_traffic(*, agents: list[str], hosts: int = 2, via_proxy: bool = False,
                              class_name: str | None = None, rate_per_s: float = 20.0):
    """A fleet with ``agents`` running (``class_name``: a ledger agent of another class, by its dotted
    name) and the checker's sender and sampler going; on any failure it prints what the checker saw
    and what the hosts said."""
    async with LedgerFleet(rate_per_s=rate_per_s) as fleet:
        fleet.start_hosts(hosts, via_proxy=via_proxy)
        await fleet.launch(agents, class_name)
        checker = fleet.start_checker(agents)
        await checker.wait_answering()
        try:
            yield fleet
        except BaseException:
            print(f"\n--- checker ---\n{checker.report().summary()}\n--- host logs ---\n{fleet.logs()}")
            raise
        print(f"\n{checker.report().summary()}")
