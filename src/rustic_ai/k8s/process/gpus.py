"""Asks nvidia-smi which GPUs this machine has (the one subprocess the resource inventory needs)."""

from __future__ import annotations

import asyncio
import logging
import shutil

log = logging.getLogger(__name__)

NVIDIA_SMI_TIMEOUT_S = 10.0


async def nvidia_smi_uuids(timeout_s: float = NVIDIA_SMI_TIMEOUT_S) -> list[str]:
    """The UUIDs of the GPUs nvidia-smi lists, in its order; [] without nvidia-smi or on any failure."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        proc = await asyncio.create_subprocess_exec(
            exe, "--query-gpu=uuid", "--format=csv,noheader",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    except OSError as exc:
        log.warning("nvidia-smi could not be started: %s; no GPUs detected", exc)
        return []
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.warning("nvidia-smi did not answer within %.0f s; no GPUs detected", timeout_s)
        return []
    if proc.returncode != 0:
        log.warning("nvidia-smi exited with %s; no GPUs detected", proc.returncode)
        return []
    return [line.strip() for line in out.decode(errors="replace").splitlines() if line.strip()]
