"""Prometheus metrics of an engine: host calls, launch retries and placement decisions.

An engine lives inside someone else's process (a guild, an API server), so it serves
nothing itself: ``AsyncK8sEngine.metrics.registry`` is a prometheus_client
``CollectorRegistry`` the application exposes however it already does, e.g.
``prometheus_client.generate_latest(engine.metrics.registry)`` from its own endpoint,
or pass ``metrics_registry=prometheus_client.REGISTRY`` to the engine to put the
series in the default registry. By default each engine gets a registry of its own, so
several engines in one process do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

PREFIX = "rustic_k8s_engine_"
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 90.0)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.host_calls = Counter(PREFIX + "host_calls", "gRPC calls to hosts, by method and status code.",
                                  ["method", "code"], registry=r)
        self.host_call_seconds = Histogram(PREFIX + "host_call_duration_seconds", "Seconds a gRPC call to a host took.",
                                           ["method"], buckets=BUCKETS, registry=r)
        self.launches = Counter(PREFIX + "launches", "Launches (run_agent/launch), by result: ok or the error class.",
                                ["result"], registry=r)
        self.launch_seconds = Histogram(PREFIX + "launch_duration_seconds",
                                        "Seconds from launch() to a host reporting the agent ready.",
                                        buckets=BUCKETS, registry=r)
        self.retries = Counter(PREFIX + "launch_retries", "Launch attempts that moved on to another host, by the "
                               "refusal (HostFullError, HostUnavailableError, LaunchTimeoutError).", ["reason"],
                               registry=r)
        self.placements = Counter(PREFIX + "placements", "Agents placed, by the host that took them.", ["host"],
                                  registry=r)
        self.stops = Counter(PREFIX + "stops", "stop_agent calls that reached a host.", registry=r)
        self.kept = Counter(PREFIX + "keeper_actions", "What the keeper did for agents Redis had lost: restored "
                            "(desired state written back) or queued (put on the orphan queue for adoption).", ["action"],
                            registry=r)

    def observe_call(self, address: str, method: str, code: str, seconds: float) -> None:
        """ChannelPool's hook (protocol/client.py ``observer``)."""
        self.host_calls.labels(method, code).inc()
        self.host_call_seconds.labels(method).observe(seconds)
