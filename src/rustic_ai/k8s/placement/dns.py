"""DNS discovery: every address one name resolves to is an agent host.

Docker Compose's embedded DNS answers a service name (``agent-host``) with the address
of every replica; a Kubernetes headless Service (``clusterIP: None``) answers with the
IP of every ready pod. Either way one lookup lists the fleet, and the port is the same
for all of them (a setting). The answer is refreshed every few seconds by a task this
source owns, with the event loop's resolver (``loop.getaddrinfo``, which runs the
blocking system call off the loop).

A failed lookup keeps the last good answer: a resolver hiccup should not make every
host vanish at once. The failure is logged and kept in ``last_error``; before any
lookup has succeeded, ``hosts()`` is empty and placement reports that no host is
available. ``changed`` (asyncio.Event) is set whenever the set of addresses changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Self

from ..base.models import HostRecord
from ..base.settings import EngineSettings
from .kubernetes import join_host_port

log = logging.getLogger(__name__)

Resolver = Callable[[str], Awaitable[list[str]]]


async def resolve_all(name: str) -> list[str]:
    """Every IPv4 and IPv6 address of ``name``, deduplicated, in the resolver's order."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: dict[str, None] = {}
    for family, *_, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            seen.setdefault(str(sockaddr[0]).split("%", 1)[0], None)  # drop an IPv6 zone index
    return list(seen)


class DnsDiscovery:
    """Hosts are the addresses a name resolves to, with one port; refreshed periodically."""

    def __init__(
        self,
        name: str,
        port: int,
        *,
        refresh_s: float = 5.0,
        start_timeout_s: float = 5.0,
        resolver: Resolver | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.refresh_s = refresh_s
        self.start_timeout_s = start_timeout_s
        self.changed = asyncio.Event()
        self.last_error: BaseException | None = None
        self._resolve = resolver or resolve_all
        self._addresses: list[str] = []
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> Self:
        return cls(
            settings.dns_name,
            settings.dns_port,
            refresh_s=settings.dns_refresh_s,
            start_timeout_s=settings.discovery_start_timeout_s,
        )

    async def start(self) -> None:
        """Resolves once (bounded) so the first placement sees hosts, then refreshes in the background."""
        if self._task is not None:
            return
        try:
            async with asyncio.timeout(self.start_timeout_s):
                await self.refresh()
        except TimeoutError:
            self.last_error = TimeoutError(f"lookup of {self.name!r} took over {self.start_timeout_s} s")
            log.warning("dns discovery: %s; starting without hosts, still trying", self.last_error)
        self._task = asyncio.create_task(self._run(), name=f"dns-discovery:{self.name}")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def hosts(self) -> list[HostRecord]:
        return [HostRecord(address=a) for a in self._addresses]

    async def refresh(self) -> bool:
        """One lookup. True if it succeeded (the host list is then its answer)."""
        try:
            found = await self._resolve(self.name)
        except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
            self.last_error = exc
            log.warning(
                "dns discovery: cannot resolve %r (%s); keeping the last %d hosts",
                self.name, exc, len(self._addresses),
            )
            return False
        self.last_error = None
        addresses = sorted({join_host_port(ip, self.port) for ip in found})
        if addresses != self._addresses:
            log.info("agent hosts behind %r: %s", self.name, ", ".join(addresses) or "none")
            self._addresses = addresses
            self.changed.set()
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()
