"""What every benchmark shares: statistics, memory readings, the machine, a private Redis.

Nothing here talks to the machine's own Redis: `PrivateRedis` starts `redis-server` on a
free loopback port, like the test suite and the local cluster do.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from typing import Any

from rustic_ai.core.guild.builders import AgentBuilder, GuildBuilder
from rustic_ai.core.guild.dsl import AgentSpec, GuildSpec
from rustic_ai.core.messaging import MessagingConfig

RESPONDER_CLASS = "rustic_ai.testing.execution.integration_agents.ResponderProbeAgent"
HELLO = {"content": "Hello Responder!"}
REPUBLISH_S = 0.020  # re-publish period while no reply has arrived (same for every engine)


# -- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in 0..100."""
    if not values:
        return math.nan
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return float(data[lo] + (data[hi] - data[lo]) * (pos - lo))


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/min/max/mean of a sample (same unit as the sample)."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "min": float(min(values)),
        "max": float(max(values)),
        "mean": float(sum(values) / len(values)),
    }


def ms(seconds: float) -> float:
    return seconds * 1000.0


# -- memory ------------------------------------------------------------------------------------


def smaps_rollup(pid: int) -> dict[str, float]:
    """Pss, Rss and Uss (private clean + dirty) of one process in MB, from /proc/PID/smaps_rollup."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    kb = 1024.0
    return {
        "pss_mb": fields.get("Pss", 0) / kb,
        "rss_mb": fields.get("Rss", 0) / kb,
        "uss_mb": (fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)) / kb,
    }


def pss_mb(pid: int) -> float:
    return smaps_rollup(pid)["pss_mb"]


_HZ = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _HZ
    except (OSError, IndexError, ValueError):
        return 0.0


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/PID/task/*/children)."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return sorted(set(out))


def descendants_of(pid: int) -> list[int]:
    found: list[int] = []
    todo = children_of(pid)
    while todo:
        p = todo.pop()
        if p not in found:
            found.append(p)
            todo += children_of(p)
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


# -- the machine ------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = 0.0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    versions = {}
    for dist in ("rusticai-core", "rusticai-redis", "rusticai-k8s", "rusticai-ray", "ray", "redis", "grpcio"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    redis_version = ""
    exe = shutil.which("redis-server")
    if exe:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=5).stdout
            redis_version = next((p.split("=", 1)[1] for p in out.split() if p.startswith("v=")), "")
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "os": platform.system(),
        "redis_server": redis_version,
        "packages": versions,
    }


# -- a private Redis ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """`redis-server` on a free 127.0.0.1 port, nothing persisted; a context manager."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="rk8s-bench-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return self
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- specs -------------------------------------------------------------------------------------


def redis_messaging(port: int) -> MessagingConfig:
    return MessagingConfig(
        backend_module="rustic_ai.redis.messaging.backend",
        backend_class="RedisMessagingBackend",
        backend_config={"redis_client": {"host": "127.0.0.1", "port": port}},
    )


def guild_spec(guild_id: str) -> GuildSpec:
    return GuildBuilder(guild_id, "Bench Guild", "benchmark guild").build_spec()


def responder(agent_id: str) -> AgentSpec:
    from rustic_ai.testing.execution.integration_agents import ResponderProbeAgent

    return (
        AgentBuilder(ResponderProbeAgent)
        .set_id(agent_id)
        .set_name(f"Responder {agent_id}")
        .set_description("answers Hello Responder!")
        .build_spec()
    )


def chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
