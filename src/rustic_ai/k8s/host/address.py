"""Which address a host advertises: one that other pods and containers can reach.

Never a wildcard or loopback address unless the operator asked for it, because the
registry hands this address to engines on other machines.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket

from ..base.errors import ConfigError

_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep:
        raise ConfigError(f"address {address!r} must be host:port")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ConfigError(f"address {address!r} has a port that is not a number") from None


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def advertised_address(listen: str, bound_port: int, advertise: str = "") -> str:
    """``advertise`` if set (port 0 in it means the bound port); else POD_IP (the
    Kubernetes downward API) with the bound port; else the listen host when it is a
    concrete address; else this machine's name resolved to an address (a compose
    container's own address)."""
    if advertise:
        host, port = split_host_port(advertise)
        return _join(host, port or bound_port)
    pod_ip = os.environ.get("POD_IP", "").strip()
    if pod_ip:
        return _join(pod_ip, bound_port)
    listen_host, _ = split_host_port(listen)
    if listen_host not in _WILDCARDS:
        return _join(listen_host, bound_port)
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(socket.gethostname(), bound_port, type=socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0])
        if not ip.is_loopback and not ip.is_unspecified:
            return _join(str(ip), bound_port)
    raise ConfigError(
        f"cannot tell which address to advertise for listen={listen!r}: set RUSTIC_AGENT_HOST_ADVERTISE "
        "(or POD_IP); loopback is only used when asked for"
    )
