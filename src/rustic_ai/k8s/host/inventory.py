"""What this host offers agents: CPUs, memory, GPU devices, custom resources, labels.

Read once at start-up. Each can be set (HostSettings: RUSTIC_AGENT_HOST_CPUS, _MEMORY_MB,
_GPUS, _RESOURCES, _LABELS); what is not set is detected:

* CPUs: the cgroup v2 quota (``cpu.max``: a pod's ``limits.cpu``), else the CPUs this process
  may run on (``sched_getaffinity``);
* memory: the cgroup's ``memory.max`` (a pod's ``limits.memory``), else ``MemTotal``;
* GPUs: the devices NVIDIA_VISIBLE_DEVICES names (the NVIDIA device plugin sets it in a pod
  that asked for ``nvidia.com/gpu``), else what ``nvidia-smi`` lists, else none. "all" means
  ask nvidia-smi; "none"/"void" mean none.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from ..base.errors import ConfigError
from ..base.resources import MILLI, HostInventory
from ..base.settings import HostSettings
from ..process.gpus import nvidia_smi_uuids

log = logging.getLogger(__name__)

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpus(root: Path = CGROUP) -> float | None:
    """CPUs of the cgroup quota (``cpu.max`` "quota period"), None when unlimited or unknown."""
    try:
        quota, _, period = (root / "cpu.max").read_text().strip().partition(" ")
        if quota != "max":
            return int(quota) / int(period or "100000")
    except (OSError, ValueError):
        pass
    return None


def cgroup_memory_mb(root: Path = CGROUP) -> int | None:
    try:
        raw = (root / "memory.max").read_text().strip()
        if raw != "max":
            return int(raw) // (1024 * 1024)
    except (OSError, ValueError):
        pass
    return None


def machine_memory_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def gpus_from_setting(value: str) -> tuple[str, ...] | None:
    """RUSTIC_AGENT_HOST_GPUS: None (detect) when empty."""
    value = value.strip()
    if not value:
        return None
    if value.lower() in ("none", "void", "0"):
        return ()
    if value.isdigit():
        return tuple(str(i) for i in range(int(value)))
    devices = tuple(d.strip() for d in value.split(",") if d.strip())
    if len(set(devices)) != len(devices):
        raise ConfigError(f"RUSTIC_AGENT_HOST_GPUS={value!r}: a device is named twice")
    return devices


async def detect_gpus(environ: Mapping[str, str],
                      smi: Callable[[], Awaitable[list[str]]] = nvidia_smi_uuids) -> tuple[str, ...]:
    visible = environ.get("NVIDIA_VISIBLE_DEVICES", "").strip()
    if visible.lower() in ("none", "void"):
        return ()
    if visible and visible.lower() != "all":
        return tuple(d.strip() for d in visible.split(",") if d.strip())
    return tuple(await smi())


async def read_inventory(settings: HostSettings, environ: Mapping[str, str] | None = None) -> HostInventory:
    env = os.environ if environ is None else environ
    cpus = settings.cpus or cgroup_cpus() or float(len(os.sched_getaffinity(0)))
    memory = settings.memory_mb or cgroup_memory_mb() or machine_memory_mb()
    gpus = gpus_from_setting(settings.gpus)
    if gpus is None:
        gpus = await detect_gpus(env)
    custom = {name: round(amount * MILLI) for name, amount in settings.custom_resources().items()}
    inventory = HostInventory(cpu=round(cpus * MILLI), mem=int(memory), gpus=gpus, custom=custom)
    log.info("resources offered to agents: %g CPUs, %d MiB, GPUs [%s]%s", cpus, memory, ", ".join(gpus),
             "".join(f", {k}={v:g}" for k, v in settings.custom_resources().items()))
    return inventory
