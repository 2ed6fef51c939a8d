"""`rustic-k8s`: run a local cluster and operate a fleet from a terminal.

    rustic-k8s local [--hosts N] [--agents N] [--launch-mode warm|cold] [--redis-url URL] [--exit]
    rustic-k8s hosts  [-o json]
    rustic-k8s unplaced [-o json]
    rustic-k8s agents [--guild G] [-o json]
    rustic-k8s agent GUILD AGENT [--lines N] [-o json]
    rustic-k8s stop GUILD AGENT
    rustic-k8s drain HOST [--no-wait]
    rustic-k8s certs --out DIR [--namespace NS] [--engine NAME ...]

Every setting comes from its flag, else its environment variable, else its default.
Fleet commands read the registry (--redis-url / RUSTIC_K8S_REDIS_URL, --key-prefix /
RUSTIC_K8S_KEY_PREFIX, and the rest of the engine's settings from the environment) and ask
hosts over gRPC. Errors are one line on stderr, never a traceback: exit 2 for a bad
setting, 1 for anything else (Redis unreachable, no such agent).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from typing import Any

from ..base.errors import ConfigError, RegistryUnavailableError, RusticK8sError
from ..base.models import AgentKey, AgentRecord, HostRecord
from ..base.redact import redact_url
from ..base.resources import Allocation, fmt
from ..base.settings import EngineSettings, HostSettings
from . import certs


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _age(started_at: float) -> str:
    if not started_at:
        return "?"
    s = int(time.time() - started_at)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _agent_row(r: AgentRecord) -> dict[str, Any]:
    return {"guild": r.guild_id, "id": r.agent_id, "name": r.name, "class": r.class_name.rsplit(".", 1)[-1],
            "host": r.host, "pid": r.pid, "state": str(r.state), "restarts": r.restarts,
            "exit": "" if r.exit_code is None else r.exit_code,
            "resources": Allocation.from_json(r.allocation).describe()}


def _settings(args: argparse.Namespace) -> EngineSettings:
    # None (a flag left out) means "not given": the environment, then the default, decide.
    return EngineSettings.from_env(redis_url=args.redis_url, key_prefix=args.key_prefix)


def _where(settings: EngineSettings) -> str:
    return f"{redact_url(settings.redis_url)} (prefix {settings.key_prefix})"


async def _fleet(args: argparse.Namespace):
    from ..engine import AsyncK8sEngine

    return AsyncK8sEngine(args.settings, stop_agents_on_shutdown=False)


def _resource_cells(h: HostRecord) -> dict[str, str]:
    """used/total per resource, as `rustic-k8s hosts` shows them ("" for what the host does not offer)."""
    inv, used = h.inventory, h.usage
    gpus = ""
    if inv.gpus:
        gpus = f"{fmt(sum(used.gpus.values()))}/{len(inv.gpus)}"
    custom = " ".join(f"{k}={fmt(used.custom.get(k, 0))}/{fmt(v)}" for k, v in sorted(inv.custom.items()))
    return {"cpu": f"{fmt(used.cpu)}/{fmt(inv.cpu)}" if inv.cpu else "",
            "memory": f"{used.mem}/{inv.mem}Mi" if inv.mem else "", "gpu": gpus, "custom": custom,
            "labels": ",".join(f"{k}={v}" for k, v in sorted(h.labels.items()))}


async def cmd_hosts(args: argparse.Namespace) -> int:
    async with await _fleet(args) as eng:
        hosts = await eng.registry.list_hosts()
    if args.output == "json":
        print(json.dumps([dataclasses.asdict(h) for h in hosts], default=str, indent=2))
    elif not hosts:
        print(f"no agent hosts registered in {_where(eng.settings)}")
    else:
        print(_table([{"address": h.address, "name": h.name, "state": str(h.state),
                       "agents": f"{h.agents}/{h.capacity}", **_resource_cells(h), "uptime": _age(h.started_at),
                       "version": h.version}
                      for h in hosts], ["address", "name", "state", "agents", "cpu", "memory", "gpu", "custom",
                                        "labels", "uptime", "version"]))
    return 0


async def cmd_unplaced(args: argparse.Namespace) -> int:
    """Wanted agents that no host could fit when they were to be placed again (failover, drain)."""
    async with await _fleet(args) as eng:
        entries = await eng.registry.list_unplaced()
    if args.output == "json":
        print(json.dumps([{"guild": u.key.guild_id, "agent": u.key.agent_id, "reason": u.reason, "host": u.host,
                           "since": u.at} for u in entries], indent=2))
    else:
        print(_table([{"guild": u.key.guild_id, "agent": u.key.agent_id, "waiting": _age(u.at),
                       "last tried on": u.host, "reason": u.reason} for u in entries],
                     ["guild", "agent", "waiting", "last tried on", "reason"]))
    return 0


async def cmd_agents(args: argparse.Namespace) -> int:
    async with await _fleet(args) as eng:
        hosts = await eng.registry.list_hosts()
        results = await asyncio.gather(
            *(eng.pool.client(h.address).list_agents(args.guild or "") for h in hosts), return_exceptions=True
        )
    records: list[AgentRecord] = []
    for host, result in zip(hosts, results, strict=True):
        if isinstance(result, BaseException):
            print(f"warning: host {host.address} did not answer: {result}", file=sys.stderr)
        else:
            records += result
    records.sort(key=lambda r: (r.guild_id, r.agent_id))
    if args.output == "json":
        print(json.dumps([{**dataclasses.asdict(r), "output": None} for r in records], default=str, indent=2))
    elif not hosts:
        print(f"no agent hosts registered in {_where(eng.settings)}")
    elif not records:
        guild = f" of guild {args.guild}" if args.guild else ""
        print(f"no agents{guild} on the {len(hosts)} agent host(s) registered in {_where(eng.settings)}")
    else:
        print(_table([_agent_row(r) for r in records],
                     ["guild", "id", "name", "class", "host", "pid", "state", "restarts", "exit", "resources"]))
    return 0


async def cmd_agent(args: argparse.Namespace) -> int:
    async with await _fleet(args) as eng:
        r = await eng.agent_info(args.guild, args.agent, output_lines=args.lines)
    if args.output == "json":
        print(json.dumps(dataclasses.asdict(r), default=str, indent=2))
    else:
        for k, v in _agent_row(r).items():
            print(f"{k + ':':<10} {v}")
        print(f"{'reason:':<10} {r.reason}\n--- last {len(r.output)} lines of output ---")
        print("\n".join(r.output))
    return 0


async def cmd_stop(args: argparse.Namespace) -> int:
    async with await _fleet(args) as eng:
        record = await eng.registry.get_agent(AgentKey(args.guild, args.agent))
        if record is None:
            print(f"agent {args.guild}/{args.agent} is not registered in {_where(eng.settings)}", file=sys.stderr)
            return 1
        await eng.stop_agent(args.guild, args.agent)
    print(f"stopped {args.guild}/{args.agent} on {record.host}")
    return 0


async def cmd_drain(args: argparse.Namespace) -> int:
    async with await _fleet(args) as eng:
        if not await eng.registry.request_drain(args.host, f"rustic-k8s drain ({args.reason})"):
            print(f"no live host {args.host} in {_where(eng.settings)} (see `rustic-k8s hosts`)", file=sys.stderr)
            return 1
        print(f"drain requested for {args.host}; its agents move to other hosts", flush=True)
        if not args.wait:
            return 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.timeout
        while loop.time() < deadline:
            if args.host not in {h.address for h in await eng.registry.list_hosts()}:
                print(f"{args.host} drained and left the fleet")
                return 0
            await asyncio.sleep(0.25)
    print(f"{args.host} still listed after {args.timeout:.0f} s", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rustic-k8s", description="Run and operate rusticai-k8s agent hosts.")
    sub = p.add_subparsers(dest="command", required=True)

    local = sub.add_parser("local", help="run a guild's agents across local agent hosts (Ctrl-C stops all)")
    local.add_argument("--hosts", type=int, default=2, help="agent hosts to start (default 2)")
    local.add_argument("--agents", type=int, default=4, help="relay agents in the demo guild (default 4)")
    local.add_argument("--launch-mode", choices=["warm", "cold"], default=None,
                       help="default: RUSTIC_AGENT_HOST_LAUNCH_MODE or warm")
    local.add_argument("--redis-url", default=None,
                       help="use this Redis (default: REDIS_URL, else a private redis-server from PATH, else the "
                            "embedded one)")
    local.add_argument("--exit", action="store_true", help="stop after the demo instead of waiting for Ctrl-C")

    def fleet(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--redis-url", default=None, help="default: RUSTIC_K8S_REDIS_URL")
        sp.add_argument("--key-prefix", default=None, help="default: RUSTIC_K8S_KEY_PREFIX or rk8s")
        sp.add_argument("-o", "--output", choices=["table", "json"], default="table")
        return sp

    fleet("hosts", "list agent hosts with their resources (used/total)")
    fleet("unplaced", "list wanted agents no host can fit (they wait in the orphan queue)")
    agents = fleet("agents", "list agents on every host")
    agents.add_argument("--guild", default="", help="only this guild")
    agent = fleet("agent", "show one agent with its recent output")
    agent.add_argument("guild")
    agent.add_argument("agent")
    agent.add_argument("--lines", type=int, default=50)
    stop = fleet("stop", "stop an agent")
    stop.add_argument("guild")
    stop.add_argument("agent")
    drain = fleet("drain", "drain a host: its agents move to other hosts, then it exits")
    drain.add_argument("host", help="the host's address, as `rustic-k8s hosts` lists it")
    drain.add_argument("--reason", default="operator")
    drain.add_argument("--no-wait", dest="wait", action="store_false", help="return once requested")
    drain.add_argument("--timeout", type=float, default=40.0)
    certs.add_parser(sub)
    return p


def _local(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .logs import configure_logging

    if args.hosts < 1 or args.agents < 1:
        raise ConfigError(f"--hosts {args.hosts} --agents {args.agents}: the demo needs at least one of each")
    # The hosts' own settings (flag, else environment, else default), checked here so a bad
    # value is one line from this command rather than a host that does not start.
    host = HostSettings.from_env(launch_mode=args.launch_mode)
    configure_logging("WARNING")
    return asyncio.run(run_demo(args.hosts, args.agents, host.launch_mode, stay=not args.exit,
                                capacity=host.capacity, redis_url=args.redis_url or os.environ.get("REDIS_URL")))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"hosts": cmd_hosts, "agents": cmd_agents, "agent": cmd_agent, "stop": cmd_stop, "drain": cmd_drain,
                "unplaced": cmd_unplaced}
    if args.command == "certs":
        return certs.run(args)
    try:
        if args.command == "local":
            return _local(args)
        args.settings = _settings(args)
        return asyncio.run(handlers[args.command](args))
    except ConfigError as exc:
        print(f"rustic-k8s {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except RegistryUnavailableError as exc:
        print(f"rustic-k8s {args.command}: {exc} (is Redis up at {redact_url(args.settings.redis_url)}? "
              "set RUSTIC_K8S_REDIS_URL or --redis-url)", file=sys.stderr)
        return 1
    except RusticK8sError as exc:
        print(f"rustic-k8s {args.command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"rustic-k8s {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
