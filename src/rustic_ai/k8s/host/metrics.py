"""Prometheus metrics of an agent host, served over HTTP on the event loop.

Two kinds of numbers:

* events, counted as they happen by hooks in the host and the gRPC server adapter:
  launches by result, launch duration, stops, crashes by cause, restarts, failures,
  memory kills, gRPC calls by method and status code;
* state, computed when Prometheus scrapes (a custom collector), so nothing can drift:
  agents by state, capacity, seconds since the lease was last renewed (heartbeat lag),
  and each running agent's resident memory and CPU time, read from /proc.

Each host has its own ``CollectorRegistry`` (several hosts in one test process do not
collide). ``MetricsServer`` serves ``GET /metrics`` with aiohttp on the host's own event
loop: prometheus_client's ``start_http_server`` would start a thread, and the host has
none. The endpoint is off unless RUSTIC_AGENT_HOST_METRICS_LISTEN is set; it has no
authentication, and the labels name guilds and agents, so expose it to Prometheus only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..base import errors as e
from ..base.models import AgentState
from ..base.resources import MILLI, HostInventory, Usage
from .procstat import cpu_seconds, rss_bytes

log = logging.getLogger(__name__)

PREFIX = "rustic_agent_host_"
LAUNCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

# Launch results by error class (subclasses first); anything else is "error".
_RESULTS: list[tuple[type[Exception], str]] = [
    (e.ForbiddenModuleError, "forbidden"),
    (e.GuildLimitError, "guild_limit"),
    (e.InvalidSpecError, "invalid"),
    (e.AgentAlreadyExistsError, "duplicate"),
    (e.HostFullError, "full"),
    (e.HostUnavailableError, "unavailable"),
    (e.RegistryUnavailableError, "registry_unavailable"),
    (e.LaunchTimeoutError, "timeout"),
    (e.AgentLaunchError, "failed"),
]


def launch_result(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    return next((name for cls, name in _RESULTS if isinstance(exc, cls)), "error")


@dataclasses.dataclass
class AgentView:
    guild_id: str
    agent_id: str
    state: str
    pid: int = 0  # 0: no process (waiting to restart, or finished)


@dataclasses.dataclass
class HostView:
    """What the scrape-time collector reads from the host."""

    agents: list[AgentView]
    capacity: int
    draining: bool
    heartbeat_lag_s: float | None  # None: never renewed yet
    memory_limit_bytes: int = 0
    inventory: HostInventory = dataclasses.field(default_factory=HostInventory)
    usage: Usage = dataclasses.field(default_factory=Usage)


class _LiveCollector(Collector):
    def __init__(self, metrics: HostMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable:
        view_of = self._metrics.view
        if view_of is None:
            return
        view = view_of()
        by_state = GaugeMetricFamily(PREFIX + "agents", "Agents on this host by state.", labels=["state"])
        counts = {s.value: 0 for s in AgentState}
        for a in view.agents:
            counts[a.state] = counts.get(a.state, 0) + 1
        for state, n in sorted(counts.items()):
            by_state.add_metric([state], n)
        yield by_state
        yield GaugeMetricFamily(PREFIX + "capacity", "Most agents this host runs at once.", value=view.capacity)
        yield GaugeMetricFamily(PREFIX + "draining", "1 while the host drains.", value=1 if view.draining else 0)
        yield GaugeMetricFamily(
            PREFIX + "heartbeat_lag_seconds",
            "Seconds since the host last renewed its lease in Redis (NaN before the first renewal).",
            value=math.nan if view.heartbeat_lag_s is None else view.heartbeat_lag_s,
        )
        yield GaugeMetricFamily(PREFIX + "agent_memory_limit_bytes",
                                "Per-agent RSS limit (0 = none).", value=view.memory_limit_bytes)
        yield from _resource_metrics(view.inventory, view.usage)
        rss = GaugeMetricFamily(PREFIX + "agent_resident_memory_bytes", "Resident memory of each running agent.",
                                labels=["guild_id", "agent_id"])
        cpu = CounterMetricFamily(PREFIX + "agent_cpu_seconds", "CPU time (user + system) of each running agent.",
                                  labels=["guild_id", "agent_id"])
        for a in view.agents:
            if not a.pid:
                continue
            r, c = rss_bytes(a.pid), cpu_seconds(a.pid)
            if r is not None:
                rss.add_metric([a.guild_id, a.agent_id], r)
            if c is not None:
                cpu.add_metric([a.guild_id, a.agent_id], c)
        yield rss
        yield cpu


def _resource_metrics(inv: HostInventory, used: Usage) -> Iterable:
    """Totals and amounts in use per resource (cpu and gpu in units, memory in MiB), and per GPU device."""
    total = GaugeMetricFamily(PREFIX + "resource_capacity", "Resources this host offers agents (cpu, gpu: units; "
                              "memory_mb; custom:<name>).", labels=["resource"])
    in_use = GaugeMetricFamily(PREFIX + "resource_used", "Resources its agents hold (same units).", labels=["resource"])
    rows = [("cpu", inv.cpu / MILLI, used.cpu / MILLI), ("memory_mb", inv.mem, used.mem),
            ("gpu", len(inv.gpus), sum(used.gpus.values()) / MILLI)]
    rows += [(f"custom:{k}", v / MILLI, used.custom.get(k, 0) / MILLI) for k, v in sorted(inv.custom.items())]
    for name, t, u in rows:
        total.add_metric([name], t)
        in_use.add_metric([name], u)
    device = GaugeMetricFamily(PREFIX + "gpu_used", "Share of each GPU device its agents hold (0-1).",
                               labels=["device"])
    for d in inv.gpus:
        device.add_metric([d], used.gpus.get(d, 0) / MILLI)
    return [total, in_use, device]


class HostMetrics:
    """The host's metrics; ``registry`` is what the endpoint serves."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.launches = Counter(PREFIX + "launches", "Agent launches by result (ok, invalid, forbidden, "
                                "guild_limit, duplicate, full, unavailable, timeout, failed, ...).",
                                ["result"], registry=r)
        self.launch_seconds = Histogram(PREFIX + "launch_duration_seconds",
                                        "Seconds from CreateAgent to the agent reporting ready (successful launches).",
                                        buckets=LAUNCH_BUCKETS, registry=r)
        self.stops = Counter(PREFIX + "stops", "Agents stopped on request or by a drain.", registry=r)
        self.crashes = Counter(PREFIX + "crashes", "Agent processes that exited without being asked, by cause "
                               "(exit, memory).", ["cause"], registry=r)
        self.restarts = Counter(PREFIX + "restarts", "Agents restarted after a crash.", registry=r)
        self.failures = Counter(PREFIX + "failures", "Agents marked failed (restart limit reached, restarts "
                                "disabled, or the host was draining).", registry=r)
        self.grpc_requests = Counter(PREFIX + "grpc_requests", "gRPC calls answered, by method and status code.",
                                     ["method", "code"], registry=r)
        self.grpc_seconds = Histogram(PREFIX + "grpc_request_duration_seconds", "Seconds to answer a gRPC call.",
                                      ["method"], buckets=LAUNCH_BUCKETS, registry=r)
        for result in ["ok", *(name for _, name in _RESULTS), "error"]:
            self.launches.labels(result)  # every series exists from the start (rate() needs a zero)
        for cause in ("exit", "memory"):
            self.crashes.labels(cause)
        self.view: Callable[[], HostView] | None = None
        r.register(_LiveCollector(self))

    def observe_call(self, method: str, code: str, seconds: float) -> None:
        """The gRPC server adapter's hook (protocol/server.py ``observer``)."""
        self.grpc_requests.labels(method, code).inc()
        self.grpc_seconds.labels(method).observe(seconds)

    def launched(self, exc: BaseException | None, seconds: float) -> None:
        self.launches.labels(launch_result(exc)).inc()
        if exc is None:
            self.launch_seconds.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """``GET /metrics`` on ``listen`` (host:port, port 0 = any), served on the running event loop."""

    def __init__(self, metrics: HostMetrics, listen: str) -> None:
        self.metrics = metrics
        self.listen = listen
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, _request: web.Request) -> web.Response:
        body = self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> int:
        host, _, port = self.listen.rpartition(":")
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host.strip("[]") or None, int(port))
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr]
        self.port = sockets[0].getsockname()[1] if sockets else int(port)
        log.info("metrics on http://%s:%d/metrics", host or "0.0.0.0", self.port)
        return self.port

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
