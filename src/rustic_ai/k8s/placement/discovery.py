"""Discovery: which agent hosts exist. Sources sit behind one small interface.

A source answers `hosts()` with `HostRecord`s. What a source knows varies: the registry
knows load and state (hosts write them), a static list knows only addresses. The engine
merges a source's answer with the registry's view (`merge_with_registry`) so placement
always sees load and draining state where the registry has them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from ..base.models import HostRecord
from ..registry import LocationRegistry


class Discovery(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def hosts(self) -> list[HostRecord]: ...


class RegistryDiscovery:
    """Hosts that registered themselves in Redis and whose lease is current."""

    def __init__(self, registry: LocationRegistry) -> None:
        self._registry = registry

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def hosts(self) -> list[HostRecord]:
        return await self._registry.list_hosts()


class StaticDiscovery:
    """A fixed list of host:port addresses (flags, environment, tests)."""

    def __init__(self, addresses: list[str] | tuple[str, ...]) -> None:
        self.addresses = sorted(set(addresses))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def hosts(self) -> list[HostRecord]:
        return [HostRecord(address=a) for a in self.addresses]


def merge_with_registry(found: list[HostRecord], registered: list[HostRecord]) -> list[HostRecord]:
    """Discovered hosts, with load and state taken from the registry where it knows them."""
    by_address = {h.address: h for h in registered}
    return [by_address.get(h.address, h) for h in found]


class CachedHosts:
    """Reuses a host listing for a short while so a burst of launches reads it once."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._at = 0.0
        self._hosts: list[HostRecord] | None = None

    def get(self) -> list[HostRecord] | None:
        if self._hosts is not None and time.monotonic() - self._at < self._ttl_s:
            return self._hosts
        return None

    def put(self, hosts: list[HostRecord]) -> None:
        self._hosts, self._at = hosts, time.monotonic()

    def adjust(self, address: str, change: Callable[[HostRecord], HostRecord]) -> None:
        """Replaces one host of the cached listing by ``change(host)`` (an engine counting its own
        placements in until the listing is read again)."""
        hosts = self._hosts
        if hosts is None:
            return
        for i, h in enumerate(hosts):
            if h.address == address:
                self._hosts = [*hosts[:i], change(h), *hosts[i + 1:]]
                return

    def invalidate(self) -> None:
        self._hosts = None
