"""What an agent needs and what a host has: CPUs, memory, GPUs, custom resources, labels.

Amounts are integers so that Redis's Lua (doubles) adds and compares them exactly:
CPUs, GPUs and custom resources in thousandths (``MILLI``: 0.5 GPU = 500), memory in
MiB. Three shapes cross the layers, all plain JSON objects with short keys:

* a *request* (``ResourceRequest``, from ``AgentSpec.resources``): ``{"cpu": 1000,
  "mem": 512, "gpu": 500, "custom": {"license": 1000}}`` (zero amounts left out);
* an *inventory* (``HostInventory``, what a host advertises): ``{"cpu": 4000, "mem":
  16384, "gpus": ["GPU-…", …], "custom": {...}}``;
* an *allocation* (what the registry's claim granted one agent on one host): the request's
  amounts, with ``gpu`` replaced by ``{"<device id>": thousandths, …}``.

GPUs are devices, not a pool: a request of one or more whole GPUs takes that many
devices exclusively; a fractional request (0 < n < 1) shares one device with others up to
1.0 in all. A request like 1.5 is refused (InvalidSpecError), as Ray refuses it.

Memory has no field of its own in rusticai-core's ``ResourceSpec``; the custom resource
``memory_mb`` is read as the agent's memory (MiB), matched against the host's memory.

The placement policy (``PlacementPolicy``) says which hosts an agent may go to (a label
selector) and how a guild's agents relate (affinity: pack them on few hosts, or spread
them). It comes from ``run_agent(placement=...)``, from the guild's properties
(``GuildSpec.properties["rustic_k8s_placement"]``, also per agent id) or from engine
settings, in that order (``resolve_policy``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError, InvalidSpecError

MILLI = 1000
MAX_AMOUNT = 1e9  # keeps thousandths far inside the integers a double (Redis's Lua) holds exactly
MEMORY_RESOURCE = "memory_mb"  # the custom resource name read as memory (MiB)
GUILD_PROPERTY = "rustic_k8s_placement"
AFFINITIES = ("none", "pack", "spread", "strict_pack", "strict_spread")
DEVICE_ENV = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")  # the only variables a host sets per agent


def _milli(value: Any, what: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidSpecError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0 or number > MAX_AMOUNT:
        raise InvalidSpecError(f"{what} must be a finite number >= 0 (at most {MAX_AMOUNT:g}), got {value!r}")
    return round(number * MILLI)


def fmt(amount_milli: int) -> str:
    """Thousandths as people write them: 1000 -> "1", 500 -> "0.5"."""
    return f"{amount_milli / MILLI:g}"


def _json_object(text: str) -> dict:
    """A registry field's JSON object; {} for empty or unreadable (an older host wrote nothing)."""
    try:
        d = json.loads(text) if text else {}
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


@dataclasses.dataclass(frozen=True)
class ResourceRequest:
    cpu: int = 0  # thousandths of a CPU
    mem: int = 0  # MiB
    gpu: int = 0  # thousandths of a GPU
    custom: Mapping[str, int] = dataclasses.field(default_factory=dict)  # thousandths

    @property
    def empty(self) -> bool:
        return not (self.cpu or self.mem or self.gpu or any(self.custom.values()))

    @classmethod
    def from_agent_spec(cls, agent_spec: Mapping[str, Any]) -> ResourceRequest:
        """From an AgentSpec as a JSON object (``resources``: num_cpus, num_gpus, custom_resources)."""
        res = agent_spec.get("resources") or {}
        if not isinstance(res, Mapping):
            raise InvalidSpecError("agent_spec.resources must be an object")
        cpu = _milli(res.get("num_cpus") or 0, "resources.num_cpus")
        gpu = _milli(res.get("num_gpus") or 0, "resources.num_gpus")
        if gpu > MILLI and gpu % MILLI:
            raise InvalidSpecError(
                f"resources.num_gpus={fmt(gpu)}: a GPU request is a whole number of GPUs, or a fraction below 1 "
                "that shares one GPU"
            )
        custom_in = res.get("custom_resources") or {}
        if not isinstance(custom_in, Mapping):
            raise InvalidSpecError("resources.custom_resources must be an object")
        mem = 0
        custom: dict[str, int] = {}
        for name, value in custom_in.items():
            if not isinstance(name, str) or not name or len(name) > 100:
                raise InvalidSpecError(f"resources.custom_resources: bad resource name {name!r}")
            if name == MEMORY_RESOURCE:
                mem = math.ceil(_milli(value, f"resources.custom_resources[{name!r}]") / MILLI)
            elif amount := _milli(value, f"resources.custom_resources[{name!r}]"):
                custom[name] = amount
        return cls(cpu=cpu, mem=mem, gpu=gpu, custom=custom)

    def to_json(self) -> str:
        """The registry's form ("" for no request: such an agent takes a slot and nothing else)."""
        if self.empty:
            return ""
        out: dict[str, Any] = {k: v for k, v in (("cpu", self.cpu), ("mem", self.mem), ("gpu", self.gpu)) if v}
        if self.custom:
            out["custom"] = dict(self.custom)
        return json.dumps(out, separators=(",", ":"), sort_keys=True)

    def describe(self) -> str:
        parts = []
        if self.cpu:
            parts.append(f"{fmt(self.cpu)} CPU")
        if self.mem:
            parts.append(f"{self.mem} MiB")
        if self.gpu:
            parts.append(f"{fmt(self.gpu)} GPU")
        parts += [f"{fmt(v)} {k}" for k, v in sorted(self.custom.items())]
        return ", ".join(parts) or "nothing"


@dataclasses.dataclass(frozen=True)
class HostInventory:
    """What a host has to give (totals). ``gpus`` are device ids as NVIDIA_VISIBLE_DEVICES names them."""

    cpu: int = 0
    mem: int = 0
    gpus: tuple[str, ...] = ()
    custom: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"cpu": self.cpu, "mem": self.mem, "gpus": list(self.gpus), "custom": dict(self.custom)},
                          separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HostInventory:
        d = _json_object(text)
        return cls(cpu=int(d.get("cpu") or 0), mem=int(d.get("mem") or 0),
                   gpus=tuple(str(g) for g in d.get("gpus") or ()),
                   custom={str(k): int(v) for k, v in (d.get("custom") or {}).items()})


@dataclasses.dataclass(frozen=True)
class Usage:
    """What is allocated on a host (the sum of its agents' allocations)."""

    cpu: int = 0
    mem: int = 0
    gpus: Mapping[str, int] = dataclasses.field(default_factory=dict)  # device -> thousandths in use
    custom: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str) -> Usage:
        d = _json_object(text)
        gpus = d.get("gpu") if isinstance(d.get("gpu"), dict) else {}
        custom = d.get("custom") if isinstance(d.get("custom"), dict) else {}
        return cls(cpu=int(d.get("cpu") or 0), mem=int(d.get("mem") or 0),
                   gpus={str(k): int(v) for k, v in gpus.items()}, custom={str(k): int(v) for k, v in custom.items()})

    def plus(self, a: Allocation) -> Usage:
        gpus, custom = dict(self.gpus), dict(self.custom)
        for d, m in a.gpus.items():
            gpus[d] = gpus.get(d, 0) + m
        for k, v in a.custom.items():
            custom[k] = custom.get(k, 0) + v
        return Usage(cpu=self.cpu + a.cpu, mem=self.mem + a.mem, gpus=gpus, custom=custom)


@dataclasses.dataclass(frozen=True)
class Free:
    """What a host has left, computed once per listing (placement compares many requests with it)."""

    cpu: int
    mem: int
    custom: Mapping[str, int]
    gpu_whole: int  # devices nobody holds any of
    gpu_largest: int  # the most left on one device (thousandths)
    shares: Mapping[str, float]  # resource -> share in use: "cpu", "mem", "gpu", "custom:<name>"

    @classmethod
    def of(cls, inv: HostInventory, used: Usage) -> Free:
        frees = [MILLI - used.gpus.get(d, 0) for d in inv.gpus]
        shares: dict[str, float] = {}
        if inv.cpu:
            shares["cpu"] = used.cpu / inv.cpu
        if inv.mem:
            shares["mem"] = used.mem / inv.mem
        if inv.gpus:
            shares["gpu"] = sum(used.gpus.values()) / (MILLI * len(inv.gpus))
        for name, total in inv.custom.items():
            if total:
                shares[f"custom:{name}"] = used.custom.get(name, 0) / total
        return cls(cpu=inv.cpu - used.cpu, mem=inv.mem - used.mem,
                   custom={k: v - used.custom.get(k, 0) for k, v in inv.custom.items()},
                   gpu_whole=sum(1 for f in frees if f >= MILLI), gpu_largest=max(frees, default=0), shares=shares)


@dataclasses.dataclass(frozen=True)
class Allocation:
    """What one agent holds on its host. ``gpus``: device id -> thousandths."""

    cpu: int = 0
    mem: int = 0
    gpus: Mapping[str, int] = dataclasses.field(default_factory=dict)
    custom: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str) -> Allocation:
        u = Usage.from_json(text)
        return cls(cpu=u.cpu, mem=u.mem, gpus=dict(u.gpus), custom=dict(u.custom))

    def to_json(self) -> str:
        out: dict[str, Any] = {k: v for k, v in (("cpu", self.cpu), ("mem", self.mem)) if v}
        if self.gpus:
            out["gpu"] = dict(self.gpus)
        if self.custom:
            out["custom"] = dict(self.custom)
        return json.dumps(out, separators=(",", ":"), sort_keys=True) if out else ""

    def describe(self) -> str:
        parts = [f"{fmt(self.cpu)} CPU"] if self.cpu else []
        if self.mem:
            parts.append(f"{self.mem} MiB")
        parts += [f"GPU {d}" + ("" if m >= MILLI else f" ×{fmt(m)}") for d, m in sorted(self.gpus.items())]
        parts += [f"{fmt(v)} {k}" for k, v in sorted(self.custom.items())]
        return ", ".join(parts)


def device_env(allocation: Allocation, inventory: HostInventory) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES and NVIDIA_VISIBLE_DEVICES for an agent holding ``allocation``.

    NVIDIA_VISIBLE_DEVICES names devices as the host's inventory does (indexes or UUIDs, as
    the NVIDIA container runtime and device plugin write them). CUDA_VISIBLE_DEVICES gets a
    UUID as it is (CUDA accepts ``GPU-…``/``MIG-…``) and otherwise the device's position
    among the host's visible devices, which is how CUDA numbers them inside the container.
    An agent with no GPU sees none: both empty ("" hides every device from CUDA; "void" is
    the runtime's word for none).
    """
    devices = [d for d in inventory.gpus if d in allocation.gpus]
    if not devices:
        return {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "void"}
    cuda = [d if d.startswith(("GPU-", "MIG-")) else str(inventory.gpus.index(d)) for d in devices]
    return {"CUDA_VISIBLE_DEVICES": ",".join(cuda), "NVIDIA_VISIBLE_DEVICES": ",".join(devices)}


# -- placement policy ---------------------------------------------------------------------


def parse_labels(text: str, what: str) -> dict[str, str]:
    """``pool=gpu,zone=a`` -> {"pool": "gpu", "zone": "a"}."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what}={text!r}: expected key=value[,key=value...]")
        out[key.strip()] = value.strip()
    return out


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Equality on every key; a value ``!x`` means "not x", ``*`` means "the label exists"."""
    for key, want in selector.items():
        have = labels.get(key)
        if want == "*":
            if have is None:
                return False
        elif want.startswith("!"):
            if have == want[1:]:
                return False
        elif have != want:
            return False
    return True


@dataclasses.dataclass(frozen=True)
class PlacementPolicy:
    """Where an agent may go and how it relates to its guild's other agents.

    ``selector``: labels a host must have (see ``selector_matches``). ``affinity``: "pack"
    prefers hosts that already run agents of the guild (few hosts; Ray's PACK), "spread"
    prefers hosts with the fewest (availability; Ray's SPREAD); "strict_pack" only hosts with
    the guild's agents once it has any, "strict_spread" only hosts with none. ``wait_s``:
    how long a launch waits for capacity to appear when nothing fits (0: fail at once).
    """

    selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    affinity: str = "none"
    wait_s: float | None = None  # None: the engine's setting

    def __post_init__(self) -> None:
        if self.affinity not in AFFINITIES:
            raise InvalidSpecError(f"placement affinity {self.affinity!r}: must be one of {', '.join(AFFINITIES)}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.selector.items()):
            raise InvalidSpecError("placement selector: labels and values must be strings")
        if self.wait_s is not None and not (self.wait_s >= 0):
            raise InvalidSpecError(f"placement wait_s={self.wait_s!r}: must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.selector:
            out["selector"] = dict(self.selector)
        if self.affinity != "none":
            out["affinity"] = self.affinity
        if self.wait_s is not None:
            out["wait_s"] = self.wait_s
        return out

    @classmethod
    def from_dict(cls, d: Any, what: str = "placement") -> PlacementPolicy:
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise InvalidSpecError(f"{what} must be an object with selector, affinity, wait_s")
        unknown = set(d) - {"selector", "affinity", "wait_s", "agents"}
        if unknown:
            raise InvalidSpecError(f"{what}: unknown keys {sorted(unknown)} (selector, affinity, wait_s, agents)")
        selector = d.get("selector") or {}
        if isinstance(selector, str):
            try:
                selector = parse_labels(selector, f"{what}.selector")
            except ConfigError as exc:
                raise InvalidSpecError(str(exc)) from None
        if not isinstance(selector, Mapping):
            raise InvalidSpecError(f"{what}.selector must be an object of label -> value")
        wait = d.get("wait_s")
        try:
            wait_s = None if wait is None else float(wait)
        except (TypeError, ValueError):
            raise InvalidSpecError(f"{what}.wait_s must be a number of seconds") from None
        return cls(selector={str(k): str(v) for k, v in selector.items()}, affinity=str(d.get("affinity") or "none"),
                   wait_s=wait_s)

    def merged_over(self, base: PlacementPolicy) -> PlacementPolicy:
        """This policy, with what it leaves unset taken from ``base``."""
        return PlacementPolicy(selector={**base.selector, **self.selector},
                               affinity=self.affinity if self.affinity != "none" else base.affinity,
                               wait_s=self.wait_s if self.wait_s is not None else base.wait_s)


def resolve_policy(guild_spec: Mapping[str, Any], agent_spec: Mapping[str, Any], explicit: PlacementPolicy | None,
                   default: PlacementPolicy) -> PlacementPolicy:
    """run_agent's policy over the guild's per-agent entry over the guild's own over the engine's default."""
    props = guild_spec.get("properties") or {}
    raw = props.get(GUILD_PROPERTY) if isinstance(props, Mapping) else None
    policy = default
    if raw is not None:
        guild = PlacementPolicy.from_dict(raw, f"guild property {GUILD_PROPERTY}")
        policy = guild.merged_over(policy)
        per_agent = raw.get("agents") or {}
        if not isinstance(per_agent, Mapping):
            raise InvalidSpecError(f"guild property {GUILD_PROPERTY}.agents must map agent ids (or names) to policies")
        entry = per_agent.get(str(agent_spec.get("id", ""))) or per_agent.get(str(agent_spec.get("name", "")))
        if entry is not None:
            policy = PlacementPolicy.from_dict(entry, f"{GUILD_PROPERTY}.agents entry").merged_over(policy)
    if explicit is not None:
        policy = explicit.merged_over(policy)
    return policy


def describe_short(resource: str, needed: int, free: int) -> str:
    """A refused claim's reason as people read it: "needs 1 GPU; largest free 0.5"."""
    if resource == "gpu":
        return f"needs {fmt(needed)} GPU; largest free {fmt(free)}"
    if resource == "cpu":
        return f"needs {fmt(needed)} CPU; {fmt(max(free, 0))} free"
    if resource == "mem":
        return f"needs {needed} MiB of memory; {max(free, 0)} MiB free"
    name = resource.partition(":")[2] or resource
    return f"needs {fmt(needed)} {name}; {fmt(max(free, 0))} free"


def total_usage(allocations: list[Allocation]) -> Usage:
    """The sum of allocations (what the registry's scripts compute, for a host's own view)."""
    cpu = mem = 0
    gpus: dict[str, int] = {}
    custom: dict[str, int] = {}
    for a in allocations:
        cpu += a.cpu
        mem += a.mem
        for d, m in a.gpus.items():
            gpus[d] = gpus.get(d, 0) + m
        for k, v in a.custom.items():
            custom[k] = custom.get(k, 0) + v
    return Usage(cpu=cpu, mem=mem, gpus=gpus, custom=custom)
