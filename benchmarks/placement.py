"""Placement by resources at fleet scale, and what resources cost a launch.

    .venv/bin/python -m benchmarks.placement            # writes benchmarks/results/placement.json
    .venv/bin/python -m benchmarks.placement --quick    # 100 hosts, 1,000 agents, fewer launches

1. placement + claim: 1,000 simulated hosts (registry entries with a lease and an inventory:
   16 CPUs, 64 GiB, half of them 4 GPUs, one in ten a "license" resource; labels pool=gpu or
   pool=cpu) in a private redis-server, and 10,000 agents placed one at a time the way
   AsyncK8sEngine does it: the engine's own placement order (`AsyncK8sEngine._order`, least
   loaded, over a host listing it reuses for RUSTIC_K8S_DISCOVERY_REFRESH_S, counting its own
   placements into it meanwhile, and re-reads after a refusal), then the registry's claim
   script on the first host, the next host on a refusal. The clock runs from before the order
   to the successful claim; reading the listing is timed apart and reported alone and added
   back (``with_listing_reads_ms``). Agents ask for a mix:
   45% nothing, 20% 1 CPU, 15% 0.25 GPU, 10% 1 GPU, 5% a license, 5% 2 CPUs + 4 GiB.
   Target: p99 < 5 ms.
2. launch latency: two real warm hosts (declaring 4 GPUs each), `run_agent` to ready for a
   plain responder and for one asking 0.5 GPU + 0.5 CPU, alternated, each stopped after.
   Target: the resource-carrying p50 within 10% of the plain p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid
from pathlib import Path

from rustic_ai.core.guild.dsl import ResourceSpec

from rustic_ai.k8s import AsyncK8sEngine, EngineSettings
from rustic_ai.k8s.base.models import AgentRecord, AgentState, HostRecord, HostState
from rustic_ai.k8s.base.resources import MILLI, HostInventory, PlacementPolicy, ResourceRequest
from rustic_ai.k8s.cli.local_cluster import LocalCluster
from rustic_ai.k8s.registry import LocationRegistry

from .common import PrivateRedis, guild_spec, machine_info, ms, redis_messaging, responder, summary

RESULTS = Path(__file__).resolve().parent / "results"
MIX = [  # (weight, resources)
    (45, {}),
    (20, {"num_cpus": 1}),
    (15, {"num_gpus": 0.25}),
    (10, {"num_gpus": 1}),
    (5, {"custom_resources": {"license": 1}}),
    (5, {"num_cpus": 2, "custom_resources": {"memory_mb": 4096}}),
]


def _inventory(i: int) -> tuple[HostInventory, dict[str, str]]:
    gpus = tuple(f"GPU-{i}-{d}" for d in range(4)) if i % 2 == 0 else ()
    custom = {"license": 4 * MILLI} if i % 10 == 0 else {}
    return HostInventory(cpu=16 * MILLI, mem=64 * 1024, gpus=gpus, custom=custom), {"pool": "gpu" if gpus else "cpu"}


async def placement_and_claim(n_hosts: int, n_agents: int, seed: int = 7) -> dict:
    rnd = random.Random(seed)
    with PrivateRedis() as redis:
        prefix = f"bench-{uuid.uuid4().hex[:6]}"
        async with LocationRegistry(redis.url, prefix, lease_s=3600, agent_ttl_s=3600) as sim:
            for i in range(n_hosts):  # simulated hosts: a lease and an inventory, nothing behind them
                inv, labels = _inventory(i)
                await sim.heartbeat(HostRecord(f"10.0.{i // 250}.{i % 250}:50051", name=f"sim-{i}", capacity=100,
                                               state=HostState.SERVING, inventory=inv, labels=labels), [])
        settings = EngineSettings.from_env({}, redis_url=redis.url, key_prefix=prefix, discovery_refresh_s=2.0)
        async with AsyncK8sEngine(settings) as engine:
            registry = engine.registry
            messaging = redis_messaging(redis.port)
            guilds = [guild_spec(f"g{i}") for i in range(100)]
            weights = [w for w, _ in MIX]
            samples, with_reads, decide, tries, refreshes, refused = [], [], [], [], [], 0
            list_s: list[float] = []
            for n in range(n_agents):
                resources = rnd.choices([r for _, r in MIX], weights)[0]
                spec = responder(f"a{n}").model_copy(update={"resources": ResourceSpec(**resources)})
                request = engine.build_request(guilds[n % len(guilds)], spec, messaging)
                need = ResourceRequest.from_agent_spec(request.agent_spec).to_json()
                policy = PlacementPolicy.from_dict(request.placement)
                cached = engine._hosts.get()
                read_s = 0.0
                if cached is None:  # once per discovery_refresh_s, and after a refusal: timed apart
                    t = time.perf_counter()
                    cached = await engine._live_hosts()
                    read_s = time.perf_counter() - t
                    list_s.append(read_s)
                    refreshes.append(n)
                began = time.perf_counter()
                order = await engine._order(cached, request, policy)
                decided = time.perf_counter()
                attempts = 0
                for host in order:
                    attempts += 1
                    record = AgentRecord(request.key.guild_id, request.key.agent_id, name=spec.name,
                                         class_name=spec.class_name, spec_json="{}", host=host.address,
                                         state=AgentState.RUNNING)
                    claim = await registry.claim_agent(record, need=need)
                    if claim.ok:
                        engine.note_placed(host.address, claim.allocation)  # as after a host's answer
                        break
                    engine._hosts.invalidate()  # as the engine does after a refusal
                else:
                    refused += 1
                done = time.perf_counter()
                samples.append(done - began)
                with_reads.append(done - began + read_s)
                decide.append(decided - began)
                tries.append(attempts)
            t = time.perf_counter()
            hosts = await registry.list_hosts()
            last_list = time.perf_counter() - t
            used_gpu = sum(sum(h.usage.gpus.values()) for h in hosts) / MILLI
    stats = {k: (ms(v) if k not in ("n",) else v) for k, v in summary(samples).items()}
    return {
        "scenario": "placement+claim", "hosts": n_hosts, "agents": n_agents, "unit": "ms", **stats,
        "decision_ms": summary([ms(v) for v in decide]),
        "with_listing_reads_ms": summary([ms(v) for v in with_reads]),
        "claims_per_placement_mean": sum(tries) / len(tries), "refused": refused,
        "listing_refreshes": len(refreshes), "list_hosts_ms": summary([ms(v) for v in list_s]),
        "list_hosts_final_ms": ms(last_list), "gpus_in_use_at_end": used_gpu,
        "samples_ms": [round(ms(v), 4) for v in samples[:: max(1, len(samples) // 2000)]],
    }


async def launch_latency(n: int) -> dict:
    cluster = LocalCluster(2, host_env={"RUSTIC_AGENT_HOST_GPUS": "4"})
    await cluster.start()
    try:
        settings = EngineSettings.from_env({}, redis_url=cluster.redis_url, key_prefix=cluster.key_prefix)
        async with AsyncK8sEngine(settings) as engine:
            messaging = redis_messaging(cluster.redis_port)
            times: dict[str, list[float]] = {"plain": [], "resources": []}
            for i in range(n + 2):  # 2 warm-ups of each
                for kind in ("plain", "resources") if i % 2 == 0 else ("resources", "plain"):
                    g = guild_spec(f"lat-{uuid.uuid4().hex[:6]}")
                    spec = responder(f"{kind}{i}")
                    if kind == "resources":
                        spec = spec.model_copy(update={"resources": ResourceSpec(num_gpus=0.5, num_cpus=0.5)})
                    began = time.perf_counter()
                    await engine.run_agent(g, spec, messaging)
                    if i >= 2:
                        times[kind].append(time.perf_counter() - began)
                    await engine.stop_agent(g.id, spec.id)
    finally:
        await cluster.close()
    plain, res = summary([ms(t) for t in times["plain"]]), summary([ms(t) for t in times["resources"]])
    return {"scenario": "launch latency", "unit": "ms", "plain": plain, "resources": res,
            "ratio_p50": res["p50"] / plain["p50"],
            "samples_ms": {k: [round(ms(t), 2) for t in v] for k, v in times.items()}}


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.placement")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--hosts", type=int, default=None)
    p.add_argument("--agents", type=int, default=None)
    p.add_argument("--launches", type=int, default=None)
    args = p.parse_args(argv)
    n_hosts = args.hosts or (100 if args.quick else 1000)
    n_agents = args.agents or (1000 if args.quick else 10000)
    n_launch = args.launches or (5 if args.quick else 30)
    placed = await placement_and_claim(n_hosts, n_agents)
    print(f"placement+claim over {n_hosts} hosts, {n_agents} agents: p50 {placed['p50']:.3f} ms, "
          f"p99 {placed['p99']:.3f} ms, max {placed['max']:.2f} ms; {placed['claims_per_placement_mean']:.2f} "
          f"claims per placement; listing of the hosts p50 {placed['list_hosts_ms'].get('p50', 0):.2f} ms "
          f"({placed['listing_refreshes']} reads); with the reads p99 {placed['with_listing_reads_ms']['p99']:.2f} ms",
          flush=True)
    lat = await launch_latency(n_launch)
    print(f"launch to ready, warm: plain p50 {lat['plain']['p50']:.1f} ms, with resources p50 "
          f"{lat['resources']['p50']:.1f} ms ({lat['ratio_p50']:.2f}x)", flush=True)
    targets = [
        {"target": "placement+claim p99 < 5 ms (1,000 hosts, 10,000 agents)", "measured": placed["p99"],
         "pass": placed["p99"] < 5.0 and n_hosts >= 1000 and n_agents >= 10000},
        {"target": "launch with resources within 10% of a plain launch (p50)", "measured": lat["ratio_p50"],
         "pass": lat["ratio_p50"] <= 1.10},
    ]
    out = {"results": [placed, lat], "targets": targets, "machine": machine_info(),
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    RESULTS.mkdir(exist_ok=True)
    name = "placement.json" if not (args.quick or args.hosts or args.agents or args.launches) else \
        "placement-partial.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")
    return 0 if all(t["pass"] for t in targets) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
