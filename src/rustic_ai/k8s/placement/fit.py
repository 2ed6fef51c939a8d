"""Does an agent fit a host, by the registry's last word on the host? And if no host fits, why?

The same rules as the registry's claim script (registry/scripts.py ``allocate``), read from
the listing: placement uses them to leave out hosts that cannot take the agent and to order
the rest; the claim on the chosen host is what decides, atomically, so a listing a moment old
costs at most a refusal and a try of the next host.
"""

from __future__ import annotations

from ..base.models import HostRecord, HostState, LaunchRequest
from ..base.resources import MILLI, PlacementPolicy, ResourceRequest, describe_short, fmt, selector_matches

Shortfall = tuple[str, int, int]  # (resource, needed, largest free), as the claim script answers


def shortfall(host: HostRecord, need: ResourceRequest) -> Shortfall | None:
    """What ``host`` lacks for ``need`` (the first resource short), or None when it fits."""
    free = host.free
    if need.cpu and free.cpu < need.cpu:
        return "cpu", need.cpu, free.cpu
    if need.mem and free.mem < need.mem:
        return "mem", need.mem, free.mem
    for name, n in need.custom.items():
        have = free.custom.get(name, 0)
        if have < n:
            return f"custom:{name}", n, have
    if need.gpu:
        if need.gpu >= MILLI:
            if free.gpu_whole * MILLI < need.gpu:
                return "gpu", need.gpu, free.gpu_whole * MILLI if free.gpu_whole else free.gpu_largest
        elif free.gpu_largest < need.gpu:
            return "gpu", need.gpu, free.gpu_largest
    return None


def load(host: HostRecord, need: ResourceRequest) -> float:
    """How full the host is, 0..1: the largest share in use of its slots and of every resource
    the agent asks for (dominant share), so a GPU agent is placed by GPU load."""
    slots = host.agents / host.capacity if host.capacity > 0 else 0.0
    shares = host.free.shares
    if not shares or need.empty:
        return slots
    worst = slots
    for name, asked in (("cpu", need.cpu), ("mem", need.mem), ("gpu", need.gpu)):
        if asked and shares.get(name, 0.0) > worst:
            worst = shares[name]
    for name in need.custom:
        worst = max(worst, shares.get(f"custom:{name}", 0.0))
    return worst


def fitting(hosts: list[HostRecord], request: LaunchRequest) -> list[HostRecord]:
    """Serving hosts with a free slot, the labels the selector asks for and room for the resources."""
    need = ResourceRequest.from_agent_spec(request.agent_spec)
    selector = PlacementPolicy.from_dict(request.placement).selector
    if need.empty:
        return [h for h in hosts if h.accepts_agents and (not selector or selector_matches(selector, h.labels))]
    return [h for h in hosts if h.accepts_agents and (not selector or selector_matches(selector, h.labels)) and
            shortfall(h, need) is None]


def ranked(hosts: list[HostRecord], request: LaunchRequest) -> list[tuple[float, HostRecord]]:
    """(load, host) for every host that fits (``fitting``), in the hosts' order, in one pass.

    The hot path of every placement (a thousand hosts per launch in a large fleet): the checks of
    ``fitting``, ``shortfall`` and ``load`` inlined over each host's precomputed ``free``.
    """
    need = ResourceRequest.from_agent_spec(request.agent_spec)
    selector = PlacementPolicy.from_dict(request.placement).selector
    cpu, mem, gpu, custom = need.cpu, need.mem, need.gpu, tuple(need.custom.items())
    whole = gpu // MILLI if gpu >= MILLI else 0
    serving = HostState.SERVING
    out = []
    for h in hosts:
        if h.state != serving or (h.capacity > 0 and h.agents >= h.capacity):
            continue
        if selector and not selector_matches(selector, h.labels):
            continue
        slots = h.agents / h.capacity if h.capacity > 0 else 0.0
        if need.empty:
            out.append((slots, h))
            continue
        f = h.free
        if (cpu and f.cpu < cpu) or (mem and f.mem < mem):
            continue
        if gpu and ((whole and f.gpu_whole < whole) or (not whole and f.gpu_largest < gpu)):
            continue
        if custom and any(f.custom.get(k, 0) < n for k, n in custom):
            continue
        shares = f.shares
        worst = slots
        if cpu and shares.get("cpu", 0.0) > worst:
            worst = shares["cpu"]
        if mem and shares.get("mem", 0.0) > worst:
            worst = shares["mem"]
        if gpu and shares.get("gpu", 0.0) > worst:
            worst = shares["gpu"]
        for k, _ in custom:
            worst = max(worst, shares.get(f"custom:{k}", 0.0))
        out.append((worst, h))
    return out


def explain_no_fit(hosts: list[HostRecord], request: LaunchRequest) -> str:
    """Why no host fits, naming what is short: "needs 1 GPU; largest free 0.5 (2 hosts ...)"."""
    need = ResourceRequest.from_agent_spec(request.agent_spec)
    selector = PlacementPolicy.from_dict(request.placement).selector
    serving = [h for h in hosts if h.accepts_agents]
    matching = [h for h in serving if selector_matches(selector, h.labels)]
    parts = []
    if not serving:
        return "no host is serving with a free slot"
    if selector and len(matching) < len(serving):
        parts.append(f"{len(serving) - len(matching)} of {len(serving)} hosts do not match the selector "
                     + ",".join(f"{k}={v}" for k, v in sorted(selector.items())))
    largest: dict[str, tuple[int, int]] = {}
    for h in matching:
        s = shortfall(h, need)
        if s is not None:
            name, n, free = s
            if name not in largest or free > largest[name][1]:
                largest[name] = (n, free)
    for name, (n, free) in sorted(largest.items()):
        parts.insert(0, describe_short(name, n, free))
    if matching and not largest:
        parts.append("every matching host fits by the last listing (it changed meanwhile)")
    return "; ".join(parts) + f" (over {len(matching)} host{'s' if len(matching) != 1 else ''}" + (
        f"; the agent asks for {need.describe()})" if not need.empty else ")")


__all__ = ["explain_no_fit", "fitting", "fmt", "load", "ranked", "shortfall"]
