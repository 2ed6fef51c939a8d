"""Settings for the two kinds of process: an agent host and an engine.

Every field names its environment variable, unit and reason in its metadata; `from_env`
reads them all and a bad value raises ConfigError naming the variable. Durations are
float seconds named ``*_s``. Settings are translated into grpc/redis keyword arguments
only inside the adapters. `describe()` renders the table in the README's configuration
reference, so the docs and the code cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, Self

from .allowlist import DEFAULT_ALLOWED_MODULES
from .errors import ConfigError
from .redact import MASK, redact_url
from .resources import AFFINITIES, parse_labels

ENGINE_PREFIX = "RUSTIC_K8S_"
HOST_PREFIX = "RUSTIC_AGENT_HOST_"


def _field(default: Any, env: str, doc: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"env": env, "doc": doc}, **kw)
    return dataclasses.field(default=default, metadata={"env": env, "doc": doc}, **kw)


def _convert(raw: str, target: type, env: str) -> Any:
    try:
        if target is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if target is int:
            return int(raw)
        if target is float:
            return float(raw)
        if target is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return raw
    except ValueError:
        raise ConfigError(f"{env}={raw!r} is not a valid {target.__name__}") from None


class _EnvSettings:
    """Mixin: build a frozen settings dataclass from environment variables plus overrides."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Each field from, in order: its override (a flag), its environment variable, its default.

        An override of None means "not given" (an argparse flag left out), so the
        environment still counts for that field.
        """
        env = os.environ if environ is None else environ
        given = {k: v for k, v in overrides.items() if v is not None}
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            name = f.metadata.get("env")
            if name and name in env and f.name not in given:
                values[f.name] = _convert(env[name], _type_of(f), name)
        values.update(given)
        settings = cls(**values)
        settings.validate()  # type: ignore[attr-defined]
        return settings

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(environment variable, default, meaning) for each field, for the docs and --help."""
        rows = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if "env" not in f.metadata:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if isinstance(default, tuple):
                default = ",".join(default)
            rows.append((f.metadata["env"], str(default), f.metadata["doc"]))
        return rows

    def _require(self, ok: bool, field_name: str, why: str) -> None:
        if not ok:
            f = next(f for f in dataclasses.fields(self) if f.name == field_name)  # type: ignore[arg-type]
            value = getattr(self, field_name)
            # Never echo a secret: URLs lose their password, secret fields their value.
            if not f.repr:
                value = MASK
            elif isinstance(value, str) and "://" in value:
                value = redact_url(value)
            raise ConfigError(f"{f.metadata.get('env', field_name)}={value!r}: {why}")

    def __repr__(self) -> str:
        # The generated repr would print a Redis URL's password; this one redacts it.
        shown = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if not f.repr:
                value = MASK if value else value
            elif isinstance(value, str) and "://" in value:
                value = redact_url(value)
            shown.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"


def _type_of(f: dataclasses.Field) -> type:
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
    return {"int": int, "float": float, "bool": bool, "str": str}.get(
        annotation, tuple if annotation.startswith("tuple") else str
    )


# Redis connection settings, shared by hosts, engines and the CLI (same variables).
_REDIS_URL_DOC = (
    "Redis for the location registry: redis:// (plain), rediss:// (TLS) or unix://; may carry user:password "
    "(never logged)."
)
_REDIS_USERNAME_DOC = "Redis ACL user (AUTH); overrides a user in the URL."
_REDIS_PASSWORD_DOC = "Redis password (AUTH); overrides one in the URL. Mount it from a Secret."
_REDIS_CA_DOC = "rediss://: PEM CA bundle that verifies the Redis server (empty: the system's CAs)."
_REDIS_CERT_DOC = "rediss://: PEM client certificate, for a Redis that requires client certificates."
_REDIS_KEY_DOC = "rediss://: PEM key of RUSTIC_K8S_REDIS_CERT_FILE."


def _validate_redis(s: _EnvSettings) -> None:
    s._require(s.redis_url.startswith(("redis://", "rediss://", "unix://")), "redis_url", "must be a redis:// URL")  # type: ignore[attr-defined]
    s._require(bool(s.redis_cert_file) == bool(s.redis_key_file), "redis_cert_file",  # type: ignore[attr-defined]
               "a Redis client certificate needs its key (RUSTIC_K8S_REDIS_KEY_FILE) and the other way round")
    tls_files = s.redis_ca_file or s.redis_cert_file  # type: ignore[attr-defined]
    s._require(not tls_files or s.redis_url.startswith("rediss://"), "redis_url",  # type: ignore[attr-defined]
               "Redis TLS files are set, so the URL must be rediss://")


@dataclasses.dataclass(frozen=True, repr=False)
class _RedisSettings(_EnvSettings):
    """The registry connection, the same for hosts, engines and the CLI."""

    redis_url: str = _field("redis://127.0.0.1:6379/0", "RUSTIC_K8S_REDIS_URL", _REDIS_URL_DOC)
    redis_username: str = _field("", "RUSTIC_K8S_REDIS_USERNAME", _REDIS_USERNAME_DOC)
    redis_password: str = _field("", "RUSTIC_K8S_REDIS_PASSWORD", _REDIS_PASSWORD_DOC, repr=False)
    redis_ca_file: str = _field("", "RUSTIC_K8S_REDIS_CA_FILE", _REDIS_CA_DOC)
    redis_cert_file: str = _field("", "RUSTIC_K8S_REDIS_CERT_FILE", _REDIS_CERT_DOC)
    redis_key_file: str = _field("", "RUSTIC_K8S_REDIS_KEY_FILE", _REDIS_KEY_DOC)
    key_prefix: str = _field("rk8s", "RUSTIC_K8S_KEY_PREFIX", "Prefix of every registry key; one per fleet.")


@dataclasses.dataclass(frozen=True, repr=False)
class HostSettings(_RedisSettings):
    """An agent host (`rustic-agent-host`)."""

    listen: str = _field("0.0.0.0:50051", HOST_PREFIX + "LISTEN", "gRPC listen address host:port (port 0 = any).")
    advertise: str = _field(
        "",
        HOST_PREFIX + "ADVERTISE",
        "Address others reach this host at. Empty: POD_IP (downward API) with the listen port, "
        "else the listen address when it is not a wildcard.",
    )
    name: str = _field("", HOST_PREFIX + "NAME", "Host name in listings; empty = HOSTNAME or the machine's name.")
    capacity: int = _field(100, HOST_PREFIX + "CAPACITY", "Most agents this host runs at once.")
    heartbeat_s: float = _field(20.0, HOST_PREFIX + "HEARTBEAT_S", "Seconds between refreshes of the agents' TTLs.")
    agent_ttl_s: float = _field(60.0, HOST_PREFIX + "AGENT_TTL_S", "Seconds an agent's registry entry lives unrefreshed.")
    lease_s: float = _field(
        5.0, HOST_PREFIX + "LEASE_S",
        "Host lease: seconds without renewal before others declare this host dead and re-place its agents.",
    )
    lease_renew_s: float = _field(1.0, HOST_PREFIX + "LEASE_RENEW_S", "Seconds between lease renewals.")
    fence_margin_s: float = _field(
        1.0, HOST_PREFIX + "FENCE_MARGIN_S",
        "Agents of a host that could not renew its lease for lease_s minus this are dead (each agent process "
        "enforces it on itself, so a stalled host cannot keep a copy running once others may adopt it).",
    )
    fence_grace_s: float = _field(
        0.0, HOST_PREFIX + "FENCE_GRACE_S",
        "Seconds before that deadline an agent starts stopping cleanly (finishing the message in hand); "
        "0 = automatic: a third of lease_s - fence_margin_s - lease_renew_s, at most 1 s.",
    )
    hold_max_s: float = _field(
        45.0, HOST_PREFIX + "HOLD_MAX_S",
        "When no host can reach Redis nobody can adopt, so agents keep running (their deadline is extended on "
        "every peer host's word that it cannot reach Redis either) for at most this long after the host last "
        "reached Redis; then they stop and start again once Redis answers. Fleet-wide: use one value.",
    )
    max_restarts: int = _field(5, HOST_PREFIX + "MAX_RESTARTS", "Restarts of a crashed agent allowed per window.")
    restart_window_s: float = _field(60.0, HOST_PREFIX + "RESTART_WINDOW_S", "Window of the restart limit.")
    restart_backoff_s: float = _field(1.0, HOST_PREFIX + "RESTART_BACKOFF_S", "First restart delay (doubles).")
    restart_backoff_max_s: float = _field(60.0, HOST_PREFIX + "RESTART_BACKOFF_MAX_S", "Cap of the restart delay.")
    launch_timeout_s: float = _field(60.0, HOST_PREFIX + "LAUNCH_TIMEOUT_S", "Seconds an agent has to report ready.")
    stop_grace_s: float = _field(10.0, HOST_PREFIX + "STOP_GRACE_S", "Seconds between SIGTERM and SIGKILL.")
    drain_timeout_s: float = _field(25.0, HOST_PREFIX + "DRAIN_TIMEOUT_S", "Seconds a drain may take in all.")
    max_message_bytes: int = _field(
        4 * 1024 * 1024, HOST_PREFIX + "MAX_MESSAGE_BYTES", "Largest gRPC request accepted (bytes)."
    )
    output_lines: int = _field(500, HOST_PREFIX + "OUTPUT_LINES", "Lines of each agent's stdout/stderr kept.")
    launch_mode: str = _field(
        "warm", HOST_PREFIX + "LAUNCH_MODE", "warm: fork agents from a pre-imported fork server; cold: new interpreter."
    )
    preload: tuple = _field((), HOST_PREFIX + "PRELOAD", "Extra modules the fork server imports ahead (comma-separated).")
    learn_preload: bool = _field(
        True, HOST_PREFIX + "LEARN_PRELOAD",
        "After the first launch of an agent class the fork server imports its module (if a trial import in a "
        "throwaway fork shows it starts no threads), so later launches of that class skip the import.",
    )
    log_format: str = _field("text", HOST_PREFIX + "LOG_FORMAT", "text or json.")
    log_level: str = _field("INFO", HOST_PREFIX + "LOG_LEVEL", "Python logging level.")
    # Security (README "Security"): mutual TLS, plain text only when allowed, the import allow-list.
    tls_cert_file: str = _field(
        "", HOST_PREFIX + "TLS_CERT_FILE", "PEM certificate (chain) the gRPC server presents; turns on mutual TLS."
    )
    tls_key_file: str = _field("", HOST_PREFIX + "TLS_KEY_FILE", "PEM private key of the server certificate.")
    tls_client_ca_file: str = _field(
        "", HOST_PREFIX + "TLS_CLIENT_CA_FILE",
        "PEM CA bundle that client (engine) certificates must chain to; clients without one are refused. "
        "All three TLS files are re-read when they change (certificate rotation).",
    )
    allow_plaintext: bool = _field(
        True, HOST_PREFIX + "ALLOW_PLAINTEXT",
        "Without TLS files, serve gRPC in plain text (with a warning at start-up); false: refuse to start "
        "without TLS.",
    )
    health_listen: str = _field(
        "", HOST_PREFIX + "HEALTH_LISTEN",
        "Extra plain-text port host:port serving only grpc.health.v1, for probes that cannot present a client "
        "certificate (the kubelet's) when TLS is on; empty = off.",
    )
    authz_policy_file: str = _field(
        "", HOST_PREFIX + "AUTHZ_POLICY_FILE",
        "JSON policy of what each client-certificate identity (CN or SAN, fnmatch) may do: read, launch, stop, "
        "in which guilds, which agent modules (README Security, docs/security.md); needs TLS; re-read when it "
        "changes. Empty: any certificate from the client CA may do everything.",
    )
    allowed_modules: tuple = _field(
        DEFAULT_ALLOWED_MODULES, HOST_PREFIX + "ALLOWED_MODULES",
        "Module prefixes a launch request may name (agent classes, client type, messaging backend, dependency "
        "resolvers), comma-separated; checked before anything is imported. * allows any module.",
    )
    # Limits.
    max_agents_per_guild: int = _field(
        0, HOST_PREFIX + "MAX_AGENTS_PER_GUILD",
        "Most live agents one guild may have in the whole fleet (checked at launch; FAILED_PRECONDITION); 0 = "
        "no limit.",
    )
    agent_memory_mb: int = _field(
        0, HOST_PREFIX + "AGENT_MEMORY_MB",
        "Resident memory (RSS, MiB) one agent process may use; over it the agent is killed and handled as a "
        "crash (restarted, or failed). 0 = no limit.",
    )
    memory_check_s: float = _field(1.0, HOST_PREFIX + "MEMORY_CHECK_S", "Seconds between agent memory samples.")
    # Resources (docs/resources.md): what this host offers agents that ask for resources.
    cpus: float = _field(
        0.0, HOST_PREFIX + "CPUS", "CPUs offered to agents' num_cpus; 0 = the cgroup's CPU limit, else the CPUs this "
        "process may run on.",
    )
    memory_mb: int = _field(
        0, HOST_PREFIX + "MEMORY_MB", "Memory (MiB) offered to agents' memory_mb; 0 = the cgroup's memory limit, "
        "else the machine's.",
    )
    gpus: str = _field(
        "", HOST_PREFIX + "GPUS", "GPU devices: empty = detect (NVIDIA_VISIBLE_DEVICES, else nvidia-smi); none; "
        "a count N (devices 0..N-1); or a comma-separated list of device indexes or UUIDs.",
    )
    resources: str = _field(
        "", HOST_PREFIX + "RESOURCES", 'Custom resources as a JSON object, e.g. {"license": 2}: matched against '
        "agents' custom_resources.",
    )
    labels: str = _field("", HOST_PREFIX + "LABELS", "Labels for placement selectors, e.g. pool=gpu,zone=a.")
    # Observability (README "Observability").
    metrics_listen: str = _field(
        "", HOST_PREFIX + "METRICS_LISTEN", "Prometheus metrics endpoint host:port (GET /metrics); empty = off."
    )

    @property
    def agent_grace_s(self) -> float:
        """How long before the hard deadline an agent starts stopping cleanly (fence_grace_s, or derived)."""
        if self.fence_grace_s > 0:
            return self.fence_grace_s
        # A third of what is left after one renewal interval: room for a clean stop, and room
        # before it for a renewal that was slow or a hold that is still being asked for.
        return max(0.05, min(1.0, (self.lease_s - self.fence_margin_s - self.lease_renew_s) / 3))

    def validate(self) -> None:
        self._require(self.capacity > 0, "capacity", "must be at least 1")
        self._require(self.heartbeat_s > 0, "heartbeat_s", "must be positive")
        self._require(self.agent_ttl_s > self.heartbeat_s, "agent_ttl_s", "must exceed the heartbeat interval")
        self._require(self.lease_renew_s > 0, "lease_renew_s", "must be positive")
        self._require(
            self.lease_s > self.lease_renew_s + self.fence_margin_s, "lease_s",
            "must exceed lease_renew_s + fence_margin_s",
        )
        self._require(self.fence_grace_s >= 0, "fence_grace_s", "must not be negative")
        self._require(
            self.lease_s - self.fence_margin_s - self.agent_grace_s > self.lease_renew_s, "fence_grace_s",
            "lease_s - fence_margin_s - fence_grace_s must exceed lease_renew_s (else agents stop between renewals)",
        )
        self._require(self.hold_max_s >= 0, "hold_max_s", "must not be negative")
        self._require(
            self.agent_ttl_s > self.hold_max_s + self.lease_s, "agent_ttl_s",
            "must exceed hold_max_s + lease_s (an agent's entry must outlive the longest hold, or a stop made "
            "during it could be undone when the host re-registers)",
        )
        self._require(self.max_restarts >= 0, "max_restarts", "must not be negative")
        self._require(self.launch_timeout_s > 0, "launch_timeout_s", "must be positive")
        self._require(self.stop_grace_s >= 0, "stop_grace_s", "must not be negative")
        self._require(self.max_message_bytes >= 1024, "max_message_bytes", "must be at least 1024")
        self._require(self.output_lines >= 0, "output_lines", "must not be negative")
        self._require(":" in self.listen, "listen", "must be host:port")
        self._require(self.launch_mode in ("warm", "cold"), "launch_mode", "must be warm or cold")
        self._require(self.log_format in ("text", "json"), "log_format", "must be text or json")
        _validate_redis(self)
        tls = (self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)
        self._require(all(tls) or not any(tls), "tls_cert_file",
                      "TLS is half-configured: set all of RUSTIC_AGENT_HOST_TLS_CERT_FILE, _TLS_KEY_FILE and "
                      "_TLS_CLIENT_CA_FILE, or none")
        self._require(all(tls) or self.allow_plaintext, "allow_plaintext",
                      "plain text is not allowed and no TLS files are set")
        self._require(not self.authz_policy_file or all(tls), "authz_policy_file",
                      "an authorization policy needs mutual TLS (the identities are client certificates): set "
                      "RUSTIC_AGENT_HOST_TLS_CERT_FILE, _TLS_KEY_FILE and _TLS_CLIENT_CA_FILE")
        self._require(bool(self.allowed_modules), "allowed_modules", "must name at least one module prefix (or *)")
        self._require(self.max_agents_per_guild >= 0, "max_agents_per_guild", "must not be negative")
        self._require(self.agent_memory_mb >= 0, "agent_memory_mb", "must not be negative")
        self._require(self.memory_check_s > 0, "memory_check_s", "must be positive")
        self._require(not self.metrics_listen or ":" in self.metrics_listen, "metrics_listen", "must be host:port")
        self._require(not self.health_listen or ":" in self.health_listen, "health_listen", "must be host:port")
        self._require(self.cpus >= 0, "cpus", "must not be negative")
        self._require(self.memory_mb >= 0, "memory_mb", "must not be negative")
        self.custom_resources()
        self.label_map()

    def custom_resources(self) -> dict[str, float]:
        """RUSTIC_AGENT_HOST_RESOURCES as a dict; ConfigError naming the variable if it is not one."""
        if not self.resources.strip():
            return {}
        try:
            value = json.loads(self.resources)
        except ValueError as exc:
            value = exc
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and k and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for k, v in value.items())
        self._require(ok, "resources", 'must be a JSON object of name -> amount >= 0, e.g. {"license": 2}')
        return dict(value)  # type: ignore[arg-type]

    def label_map(self) -> dict[str, str]:
        return parse_labels(self.labels, HOST_PREFIX + "LABELS")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)


@dataclasses.dataclass(frozen=True, repr=False)
class EngineSettings(_RedisSettings):
    """An engine (the async engine, and `K8sExecutionEngine` built by a Guild)."""

    discovery: str = _field(
        "registry", ENGINE_PREFIX + "DISCOVERY", "Where hosts come from: registry (hosts that registered), static, kubernetes or dns."
    )
    hosts: tuple = _field((), ENGINE_PREFIX + "HOSTS", "Comma-separated host:port list for static discovery.")
    placement: str = _field(
        "least_loaded", ENGINE_PREFIX + "PLACEMENT",
        "least_loaded (spread by load), bin_packing (fill a host before the next) or round_robin; every strategy "
        "only considers hosts that fit the agent's resources and selector.",
    )
    affinity: str = _field(
        "none", ENGINE_PREFIX + "AFFINITY",
        "Default affinity of a guild's agents: none, pack, spread, strict_pack or strict_spread (docs/resources.md).",
    )
    selector: str = _field("", ENGINE_PREFIX + "SELECTOR", "Default host label selector, e.g. pool=gpu.")
    capacity_wait_s: float = _field(
        0.0, ENGINE_PREFIX + "CAPACITY_WAIT_S",
        "When no host fits an agent, how long a launch waits for capacity to appear (a scale-up) before "
        "RESOURCE_EXHAUSTED; 0 = fail at once.",
    )
    call_timeout_s: float = _field(10.0, ENGINE_PREFIX + "CALL_TIMEOUT_S", "Deadline of every gRPC call but launches.")
    launch_timeout_s: float = _field(90.0, ENGINE_PREFIX + "LAUNCH_TIMEOUT_S", "Deadline of a CreateAgent call.")
    max_message_bytes: int = _field(
        4 * 1024 * 1024, ENGINE_PREFIX + "MAX_MESSAGE_BYTES", "Largest gRPC message sent or received (bytes)."
    )
    discovery_refresh_s: float = _field(
        2.0, ENGINE_PREFIX + "DISCOVERY_REFRESH_S", "Seconds a host listing is reused before it is read again."
    )
    probe_timeout_s: float = _field(
        1.0, ENGINE_PREFIX + "PROBE_TIMEOUT_S",
        "Deadline of the Health probe sent before a launch to a host not heard from lately (frozen or "
        "partitioned hosts are skipped after this long instead of after the launch deadline).",
    )
    keeper_interval_s: float = _field(
        1.0, ENGINE_PREFIX + "KEEPER_INTERVAL_S",
        "Seconds between the engine's checks that the agents it launched are still known to Redis: desired state "
        "Redis lost is written back, and an agent left with no record and no host (its host died before "
        "re-registering it after Redis lost its data) is queued for adoption after the hosts' lease; 0 = off.",
    )
    max_restarts: int = _field(
        -1, ENGINE_PREFIX + "MAX_RESTARTS",
        "Restarts of a crashed agent allowed per window for agents this engine launches; -1 = the host's default.",
    )
    # Discovery "kubernetes": watch the EndpointSlices of the agent hosts' Service.
    k8s_namespace: str = _field(
        "",
        ENGINE_PREFIX + "NAMESPACE",
        "Namespace of the agent-host Service (kubernetes discovery). Empty: the pod's own namespace "
        "(service account namespace file), else default.",
    )
    k8s_service: str = _field(
        "rustic-agent-host", ENGINE_PREFIX + "SERVICE", "Service whose EndpointSlices list the agent hosts."
    )
    k8s_port_name: str = _field(
        "grpc", ENGINE_PREFIX + "PORT_NAME", "Name of the Service port hosts serve gRPC on (empty: the only port)."
    )
    kubeconfig: str = _field(
        "",
        ENGINE_PREFIX + "KUBECONFIG",
        "Kubeconfig outside a cluster. Empty: in-cluster config when KUBERNETES_SERVICE_HOST is set, "
        "else KUBECONFIG, else ~/.kube/config.",
    )
    k8s_watch_timeout_s: float = _field(
        300.0, ENGINE_PREFIX + "WATCH_TIMEOUT_S", "Seconds one watch request lasts before it is renewed."
    )
    k8s_backoff_initial_s: float = _field(
        0.25, ENGINE_PREFIX + "BACKOFF_INITIAL_S", "First retry delay after a Kubernetes API error (doubles)."
    )
    k8s_backoff_max_s: float = _field(
        5.0, ENGINE_PREFIX + "BACKOFF_MAX_S", "Longest retry delay after Kubernetes API errors (jittered)."
    )
    discovery_start_timeout_s: float = _field(
        5.0,
        ENGINE_PREFIX + "DISCOVERY_START_TIMEOUT_S",
        "Seconds start() waits for the first host list (kubernetes, dns) before going on without it.",
    )
    # Discovery "dns": every A/AAAA address of one name (compose service, headless Service).
    dns_name: str = _field(
        "", ENGINE_PREFIX + "DNS_NAME", "Name resolving to every agent host (dns discovery), e.g. agent-host."
    )
    dns_port: int = _field(50051, ENGINE_PREFIX + "DNS_PORT", "gRPC port of the hosts found by dns discovery.")
    dns_refresh_s: float = _field(5.0, ENGINE_PREFIX + "DNS_REFRESH_S", "Seconds between DNS lookups.")
    # Mutual TLS towards the hosts (README "Security"); without these the engine speaks plain text.
    tls_cert_file: str = _field("", ENGINE_PREFIX + "TLS_CERT_FILE", "PEM client certificate the engine presents to hosts.")
    tls_key_file: str = _field("", ENGINE_PREFIX + "TLS_KEY_FILE", "PEM private key of the client certificate.")
    tls_ca_file: str = _field("", ENGINE_PREFIX + "TLS_CA_FILE", "PEM CA bundle that host certificates must chain to.")
    tls_server_name: str = _field(
        "", ENGINE_PREFIX + "TLS_SERVER_NAME",
        "Name host certificates are checked against instead of the address dialled (e.g. one name in every "
        "host's certificate when hosts are reached by pod IP).",
    )

    def validate(self) -> None:
        self._require(
            self.discovery in ("registry", "static", "kubernetes", "dns"),
            "discovery",
            "must be registry, static, kubernetes or dns",
        )
        self._require(self.discovery != "static" or bool(self.hosts), "hosts", "static discovery needs hosts")
        self._require(self.discovery != "dns" or bool(self.dns_name), "dns_name", "dns discovery needs a name")
        self._require(0 < self.dns_port < 65536, "dns_port", "must be a TCP port")
        self._require(self.dns_refresh_s > 0, "dns_refresh_s", "must be positive")
        self._require(self.keeper_interval_s >= 0, "keeper_interval_s", "must not be negative (0 = off)")
        self._require(self.k8s_watch_timeout_s >= 1, "k8s_watch_timeout_s", "must be at least 1")
        self._require(self.k8s_backoff_initial_s > 0, "k8s_backoff_initial_s", "must be positive")
        self._require(
            self.k8s_backoff_max_s >= self.k8s_backoff_initial_s, "k8s_backoff_max_s", "must be at least the initial"
        )
        self._require(self.discovery_start_timeout_s >= 0, "discovery_start_timeout_s", "must not be negative")
        self._require(self.placement in ("round_robin", "least_loaded", "bin_packing"), "placement",
                      "must be least_loaded, bin_packing or round_robin")
        self._require(self.affinity in AFFINITIES, "affinity", f"must be one of {', '.join(AFFINITIES)}")
        parse_labels(self.selector, ENGINE_PREFIX + "SELECTOR")
        self._require(self.capacity_wait_s >= 0, "capacity_wait_s", "must not be negative")
        self._require(self.call_timeout_s > 0, "call_timeout_s", "must be positive")
        self._require(self.launch_timeout_s > 0, "launch_timeout_s", "must be positive")
        _validate_redis(self)
        tls = (self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
        self._require(all(tls) or not any(tls), "tls_cert_file",
                      "TLS is half-configured: set all of RUSTIC_K8S_TLS_CERT_FILE, _TLS_KEY_FILE and _TLS_CA_FILE, "
                      "or none")
        self._require(not self.tls_server_name or all(tls), "tls_server_name", "needs the TLS files")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)
