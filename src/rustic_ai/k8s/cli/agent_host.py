"""`rustic-agent-host`: the container entrypoint. Flags override environment variables.

SIGTERM and SIGINT only set an event; the host then drains (refuses new agents, stops
its agents with SIGTERM → grace → SIGKILL, deregisters) and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from ..base.errors import ConfigError, RusticK8sError
from ..base.settings import HostSettings
from ..host import AgentHost
from .logs import configure_logging

log = logging.getLogger("rustic_ai.k8s.agent_host")

_FLAGS = {
    # flag: settings field
    "--listen": "listen",
    "--advertise": "advertise",
    "--redis-url": "redis_url",
    "--key-prefix": "key_prefix",
    "--name": "name",
    "--capacity": "capacity",
    "--heartbeat-s": "heartbeat_s",
    "--agent-ttl-s": "agent_ttl_s",
    "--lease-s": "lease_s",
    "--launch-timeout-s": "launch_timeout_s",
    "--stop-grace-s": "stop_grace_s",
    "--max-message-bytes": "max_message_bytes",
    "--launch-mode": "launch_mode",
    "--log-format": "log_format",
    "--log-level": "log_level",
}


def parse_args(argv: list[str] | None) -> HostSettings:
    env_of = {env: default for env, default, _ in HostSettings.describe()}
    docs = {row[0]: row[2] for row in HostSettings.describe()}
    parser = argparse.ArgumentParser(
        prog="rustic-agent-host",
        description="Agent host: runs Rustic AI agents as OS processes behind a gRPC API.",
        epilog="Every flag can also be set by the environment variable shown; flags win.",
    )
    import dataclasses

    by_field = {f.name: f for f in dataclasses.fields(HostSettings)}
    for flag, field in _FLAGS.items():
        env = by_field[field].metadata["env"]
        parser.add_argument(flag, dest=field, default=None, help=f"{docs[env]} [{env}, default {env_of[env]!r}]")
    args = parser.parse_args(argv)
    overrides = {}
    for flag, field in _FLAGS.items():
        value = getattr(args, field)
        if value is not None:
            target = by_field[field].type
            try:
                overrides[field] = {"int": int, "float": float}.get(str(target), str)(value)
            except ValueError:
                parser.error(f"{flag}={value!r} is not a valid {target}")
    return HostSettings.from_env(**overrides)


async def serve(settings: HostSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AgentHost(settings) as host:
        print(f"rustic-agent-host ready on {host.address}", flush=True)
        signalled = asyncio.create_task(stop.wait(), name="signal")
        requested = asyncio.create_task(host.drain_requested.wait(), name="drain-request")
        await asyncio.wait({signalled, requested}, return_when=asyncio.FIRST_COMPLETED)
        for task in (signalled, requested):
            task.cancel()
        log.info("draining: %s", host.drain_reason or "signal received")
    # AgentHost.__aexit__ drained and deregistered.


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_args(argv)
    except ConfigError as exc:
        print(f"rustic-agent-host: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    except (OSError, RusticK8sError) as exc:
        log.error("could not start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
