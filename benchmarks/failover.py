"""Failure-model numbers with default settings (issue 4's targets).

    scripts/dev bench-failover            # or: .venv/bin/python -m benchmarks.failover

1. failover: a host is SIGKILLed; time until every agent it ran answers a message from
   another host (default 5 s lease; target < 10 s). Three rounds, median.
2. rolling restart: each of 3 hosts in turn gets a replacement, then SIGTERM (drain);
   meanwhile an engine keeps calling (lists, is_agent_running, launch + stop). Counts
   failed calls and lost agents (target: zero of each), and each drain's duration.
3. chaos: the chaos test with RUSTIC_K8S_CHAOS_FAULTS faults (default 40): duplicates,
   lost agents, orphans (target: zero).

Writes benchmarks/results/failover.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from rustic_ai.k8s import AsyncK8sEngine, EngineSettings
from rustic_ai.k8s.cli.local_cluster import LocalCluster

from .common import guild_spec, machine_info, redis_messaging, responder
from .probe import Probe

RESULTS = Path(__file__).resolve().parent / "results"
N_AGENTS = 12


async def _launch(engine: AsyncK8sEngine, guild_id: str, messaging, n: int) -> list:
    g = guild_spec(guild_id)
    reqs = [engine.build_request(g, responder(f"a{i}"), messaging, machine_id=i + 1) for i in range(n)]
    out = await engine.launch_many(reqs)
    bad = [r for r in out if isinstance(r, BaseException)]
    if bad:
        raise RuntimeError(f"launch failed: {bad[0]}")
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


async def failover(rounds: int) -> dict:
    times = []
    async with LocalCluster(3, launch_mode="warm") as cluster:
        settings = EngineSettings.from_env(cluster.env)
        messaging = redis_messaging(cluster.redis_port)
        async with AsyncK8sEngine(settings) as engine:
            for r in range(rounds):
                guild_id = f"failover-{r}-{uuid.uuid4().hex[:4]}"
                records = await _launch(engine, guild_id, messaging, N_AGENTS)
                by_host: dict[str, list] = {}
                for rec in records:
                    by_host.setdefault(rec.host, []).append(rec)
                victim_addr, victims = max(by_host.items(), key=lambda kv: len(kv[1]))
                victim = next(h for h in cluster.hosts if h.address == victim_addr)
                t0 = time.perf_counter()
                os.kill(victim.pid, signal.SIGKILL)
                # The clock runs from the kill, but the hello waits until the old copies are
                # gone: one still dying could answer it and pass for a failed-over agent.
                while any(_alive(v.pid) for v in victims):
                    await asyncio.sleep(0.005)
                probe = Probe(guild_id, messaging)
                try:
                    probe.hello()
                    ids = {v.agent_id for v in victims}
                    acks = await asyncio.to_thread(probe.wait_answers, ids, 60.0, 0.2)
                finally:
                    probe.close()
                if len(acks) != len(ids):
                    raise RuntimeError(f"round {r}: {len(ids) - len(acks)} agents never answered after failover")
                moved = await engine.list_agents(guild_id)
                assert all(m.host != victim_addr for m in moved if m.agent_id in ids)
                elapsed = max(a.at for a in acks.values()) - t0
                times.append(elapsed)
                print(f"  failover round {r + 1}: {len(ids)} agents of the killed host answering elsewhere "
                      f"after {elapsed:.2f} s", flush=True)
                await victim.proc.wait()
                await cluster.add_host()
                for rec in records:
                    await engine.stop_agent(guild_id, rec.agent_id)
    return {"scenario": "host SIGKILL -> its agents answering elsewhere", "rounds_s": [round(t, 3) for t in times],
            "median_s": round(statistics.median(times), 3), "target_s": 10.0,
            "pass": statistics.median(times) < 10.0 and max(times) < 10.0}


async def rolling_restart() -> dict:
    async with LocalCluster(3, launch_mode="warm") as cluster:
        settings = EngineSettings.from_env(cluster.env)
        messaging = redis_messaging(cluster.redis_port)
        guild_id = f"rolling-{uuid.uuid4().hex[:4]}"
        g = guild_spec(guild_id)
        calls = failures = 0
        errors: list[str] = []
        async with AsyncK8sEngine(settings) as engine:
            await _launch(engine, guild_id, messaging, N_AGENTS)
            wanted = {f"a{i}" for i in range(N_AGENTS)}
            stop = asyncio.Event()

            async def keep_calling() -> None:
                nonlocal calls, failures
                i = 0
                while not stop.is_set():
                    for op in ("list", "running", "launch", "stop"):
                        calls += 1
                        try:
                            if op == "list":
                                await engine.get_agents_in_guild(guild_id)
                            elif op == "running":
                                await engine.is_agent_running(guild_id, "a0")
                            elif op == "launch":
                                await engine.run_agent(g, responder(f"x{i}"), messaging)
                            else:
                                await engine.stop_agent(guild_id, f"x{i}")
                        except Exception as exc:  # noqa: BLE001 - every failure is counted
                            failures += 1
                            errors.append(f"{op}: {exc}")
                    i += 1

            caller = asyncio.create_task(keep_calling())
            drains = []
            for old in list(cluster.hosts):
                await cluster.add_host()
                t0 = time.perf_counter()
                code = await cluster.stop_host(old, signal.SIGTERM, timeout=30)
                drains.append(time.perf_counter() - t0)
                print(f"  {old.name} drained in {drains[-1]:.2f} s (exit {code})", flush=True)
                deadline = time.perf_counter() + 30
                while time.perf_counter() < deadline:
                    running = {r.agent_id for r in await engine.list_agents(guild_id)}
                    if wanted <= running:
                        break
                    await asyncio.sleep(0.1)
            stop.set()
            await caller
            running = {r.agent_id for r in await engine.list_agents(guild_id)}
            lost = sorted(wanted - running)
            probe = Probe(guild_id, messaging)
            try:
                probe.hello()
                acks = await asyncio.to_thread(probe.wait_answers, wanted, 30.0, 0.2)
            finally:
                probe.close()
    return {"scenario": "rolling restart of 3 hosts, one at a time", "engine_calls": calls,
            "failed_calls": failures, "errors": errors[:5], "lost_agents": lost,
            "answering_after": len(acks), "drain_s": [round(d, 2) for d in drains],
            "pass": failures == 0 and not lost and len(acks) == len(wanted)}


def chaos(faults: int) -> dict:
    env = dict(os.environ, RUSTIC_K8S_CHAOS_FAULTS=str(faults))
    root = Path(__file__).resolve().parent.parent
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                          "tests/integration/test_chaos.py", "-o", "timeout=900"],
                         cwd=root, env=env, capture_output=True, text=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("chaos:")), "")
    return {"scenario": f"chaos, {faults} seeded faults over 3 hosts / 12 agents", "summary": line,
            "seconds": round(time.perf_counter() - t0, 1), "pass": out.returncode == 0,
            "tail": "" if out.returncode == 0 else out.stdout[-2000:]}


async def run(args: argparse.Namespace) -> dict:
    results: dict = {"machine": machine_info(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "failover" in args.only:
        print("failover (default 5 s lease) ...", flush=True)
        results["failover"] = await failover(args.rounds)
    if "rolling" in args.only:
        print("rolling restart ...", flush=True)
        results["rolling_restart"] = await rolling_restart()
    if "chaos" in args.only:
        print(f"chaos ({args.faults} faults) ...", flush=True)
        results["chaos"] = await asyncio.to_thread(chaos, args.faults)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.failover", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="failover,rolling,chaos")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--faults", type=int, default=40)
    args = p.parse_args(argv)
    args.only = set(args.only.split(","))
    results = asyncio.run(run(args))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "failover.json").write_text(json.dumps(results, indent=2))
    print("\n| scenario | result | target | pass |\n|---|---|---|---|")
    if "failover" in results:
        f = results["failover"]
        print(f"| {f['scenario']} | median {f['median_s']} s (rounds {f['rounds_s']}) | < 10 s | {f['pass']} |")
    if "rolling_restart" in results:
        r = results["rolling_restart"]
        print(f"| {r['scenario']} | {r['failed_calls']} failed of {r['engine_calls']} calls, "
              f"{len(r['lost_agents'])} lost, drains {r['drain_s']} s | 0 failed, 0 lost | {r['pass']} |")
    if "chaos" in results:
        c = results["chaos"]
        print(f"| {c['scenario']} | {c['summary'] or c['tail'][-300:]} | 0 dup/lost/orphans | {c['pass']} |")
    return 0 if all(v.get("pass", True) for v in results.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
