"""A whole fleet on one machine: a private Redis and N agent hosts as child processes.

Redis comes from, in order: the URL given (``--redis-url`` / REDIS_URL), else a private
server on a free port: ``redis-server`` from PATH, or the embedded Valkey server of the
``embedded-redis`` extra (`local_redis.py`). Hosts are real ``rustic-agent-host``
processes; closing the cluster SIGTERMs them (they drain and deregister) and stops the
Redis it started, so nothing is left behind.
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
from typing import Self

from ..base.errors import ConfigError, RusticK8sError
from ..base.redact import redact_url
from .local_redis import redis_server_binary


class LocalClusterError(RusticK8sError):
    """A part of the local cluster (its Redis, a host) did not start; the message says which and why."""


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
        self.redis_host = "127.0.0.1"
        self.redis_port = 0
        self._redis_proc: asyncio.subprocess.Process | None = None
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
            self.redis_host, self.redis_port = _address_of(self.redis_url)
            # Hosts would start anyway (they wait for Redis, as a pod started before it does):
            # a wrong URL is better reported here, at once.
            await _wait_for_port(self.redis_host, self.redis_port, 5.0, f"the Redis at {redact_url(self.redis_url)}")
            return
        exe, what = redis_server_binary()
        port = free_port()
        self._redis_proc = await asyncio.create_subprocess_exec(
            exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", self._tmp, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        self.redis_port = port
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        self.progress(f"started {what}: {exe} (pid {self._redis_proc.pid})")
        await _wait_for_port("127.0.0.1", port, 10.0, what)

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
            # The host's own start-up error is one line, its last (the log goes with the cluster's
            # temporary directory when the cluster closes).
            raise LocalClusterError(f"{name} did not start: {_last_line(log_path) or 'no output'}")
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


def _address_of(url: str) -> tuple[str, int]:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.scheme != "redis" or not parsed.hostname or not parsed.port:
        raise ConfigError(f"--redis-url/REDIS_URL {redact_url(url)!r}: the local cluster needs redis://host:port/0")
    return parsed.hostname, parsed.port


async def _wait_for_port(host: str, port: int, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
            writer.close()
            await writer.wait_closed()
            return
        except (OSError, TimeoutError):
            if loop.time() > deadline:
                raise LocalClusterError(f"{what} did not answer on {host}:{port} within {timeout:.0f} s") from None
            await asyncio.sleep(0.05)


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""
