"""Does an agent fit a host, by the registry's last word on the host? And if no host fits, why?

The same rules as the registry's claim script (registry/scripts.py ``allocate``), read from
the listing: placement uses them to leave out hosts that cannot take the agent and to order
the rest; the claim on the chosen host is what decides, atomically, so a listing a moment old
costs at most a refusal and a try of the next host.
"""

from __future__ import annotations

from ..base.models import HostRecord, LaunchRequest
from ..base.resources import MILLI, PlacementPolicy, ResourceRequest, describe_short, fmt, selector_matches

Shortfall = tuple[str, int, int]  # (resource, needed, largest free), as the claim script answers


def shortfall(host: HostRecord, need: ResourceRequest) -> Shortfall | None:
    """What ``host`` lacks for ``need`` (the first resource short), or None when it fits."""
    inv, used = host.inventory, host.usage
    for name, n, total, u in (("cpu", need.cpu, inv.cpu, used.cpu), ("mem", need.mem, inv.mem, used.mem)):
        if n and total - u < n:
            return name, n, total - u
    for name, n in need.custom.items():
        free = inv.custom.get(name, 0) - used.custom.get(name, 0)
        if free < n:
            return f"custom:{name}", n, free
    if need.gpu:
        frees = [MILLI - used.gpus.get(d, 0) for d in inv.gpus]
        largest = max(frees, default=0)
        if need.gpu >= MILLI:
            whole = sum(1 for f in frees if f >= MILLI)
            if whole * MILLI < need.gpu:
                return "gpu", need.gpu, whole * MILLI if whole else largest
        elif largest < need.gpu:
            return "gpu", need.gpu, largest
    return None


def load(host: HostRecord, need: ResourceRequest) -> float:
    """How full the host is, 0..1: the largest share in use of its slots and of every resource
    the agent asks for (dominant share), so a GPU agent is placed by GPU load."""
    shares = [host.agents / host.capacity if host.capacity > 0 else 0.0]
    inv, used = host.inventory, host.usage
    if need.cpu and inv.cpu:
        shares.append(used.cpu / inv.cpu)
    if need.mem and inv.mem:
        shares.append(used.mem / inv.mem)
    if need.gpu and inv.gpus:
        shares.append(sum(used.gpus.values()) / (MILLI * len(inv.gpus)))
    for name in need.custom:
        if inv.custom.get(name):
            shares.append(used.custom.get(name, 0) / inv.custom[name])
    return max(shares)


def fitting(hosts: list[HostRecord], request: LaunchRequest) -> list[HostRecord]:
    """Serving hosts with a free slot, the labels the selector asks for and room for the resources."""
    need = ResourceRequest.from_agent_spec(request.agent_spec)
    selector = PlacementPolicy.from_dict(request.placement).selector
    return [h for h in hosts if h.accepts_agents and selector_matches(selector, h.labels) and
            shortfall(h, need) is None]


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


__all__ = ["explain_no_fit", "fitting", "fmt", "load", "shortfall"]
