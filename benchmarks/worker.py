"""One benchmark worker: ``python -m benchmarks.worker CONFIG_JSON OUT_PATH``.

The orchestrator starts one worker per engine (and one each for the registry and density
scenarios) so nothing one engine leaves behind (threads, forked children, imports, a Ray
runtime) can change another engine's numbers. A worker writes a list of result rows
(dicts) to OUT_PATH as JSON and prints progress on stdout.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import logging
import os
import random
import sys
import time
import traceback
import uuid
import warnings
from typing import Any

from .common import REPUBLISH_S, cpu_seconds, guild_spec, ms, percentile, pss_mb, responder, smaps_rollup, summary
from .engines import Adapter, K8sAdapter, make_adapter, settle

LAUNCH_TIMEOUT_S = 60.0  # one launch, until its first reply
IDLE_SETTLE_S = 2.0  # agents sit idle this long before memory is read


def say(msg: str) -> None:
    print(f"    {msg}", flush=True)


def uid() -> str:
    return uuid.uuid4().hex[:8]


# -- launch -> first reply -------------------------------------------------------------------------


async def launch_scenario(adapter: Adapter, n: int, warmup: int) -> dict[str, Any]:
    from .probe import Probe

    samples: list[dict[str, Any]] = []
    warmups: list[float] = []
    failures: list[str] = []
    for i in range(warmup + n):
        gid = f"bench-{adapter.key}-{i}-{uid()}"
        aid = f"responder-{i}-{uid()}"
        probe = Probe(gid, adapter.messaging)
        try:
            g, a = guild_spec(gid), responder(aid)
            t0 = time.perf_counter()
            await adapter.run_agent(g, a, machine_id=(i % 200) + 1)
            t_returned = time.perf_counter()
            probe.hello()  # right after run_agent returned; re-published every 20 ms until answered
            got = await asyncio.to_thread(probe.wait_answers, {aid}, LAUNCH_TIMEOUT_S, REPUBLISH_S)
            ack = got.get(aid)
            if ack is None:
                failures.append(f"{aid}: no reply within {LAUNCH_TIMEOUT_S:.0f} s")
            elif i < warmup:
                warmups.append(round(ms(ack.at - t0), 3))
            else:
                samples.append({
                    "total_ms": ms(ack.at - t0),
                    "run_agent_ms": ms(t_returned - t0),
                    "answered_publish": probe.publish_index(ack.hello_id),
                    "publishes": len(probe.hellos),
                })
            tag = "warm-up" if i < warmup else f"{i - warmup + 1}/{n}"
            if ack is not None:
                say(f"{adapter.key} launch {tag}: first reply {ms(ack.at - t0):7.1f} ms "
                    f"(run_agent {ms(t_returned - t0):6.1f} ms, answered hello #{probe.publish_index(ack.hello_id)})")
            await adapter.stop_agent(gid, aid)
        except Exception as exc:
            failures.append(f"{aid}: {type(exc).__name__}: {exc}")
            say(f"{adapter.key} launch {i}: FAILED {type(exc).__name__}: {exc}")
        finally:
            probe.close()
    totals = [s["total_ms"] for s in samples]
    st = summary(totals)
    return {
        "engine": adapter.label,
        "engine_key": adapter.key,
        "scenario": "launch_to_first_reply",
        "p50_ms": st.get("p50"),
        "p95_ms": st.get("p95"),
        "p99_ms": st.get("p99"),
        "min_ms": st.get("min"),
        "max_ms": st.get("max"),
        "n": len(samples),
        "warmup": warmup,
        "run_agent_p50_ms": percentile([s["run_agent_ms"] for s in samples], 50),
        "answered_first_publish": sum(1 for s in samples if s["answered_publish"] == 1),
        "samples_ms": [round(t, 3) for t in totals],
        "run_agent_samples_ms": [round(s["run_agent_ms"], 3) for s in samples],
        "warmup_samples_ms": warmups,
        "method": f"one hello right after run_agent returned, re-published every {REPUBLISH_S * 1000:.0f} ms "
                  "until the first reply; a fresh guild per launch",
        "failures": failures,
        "notes": list(adapter.notes),
    }


# -- memory ----------------------------------------------------------------------------------------


async def memory_scenario(adapter: Adapter, n: int) -> dict[str, Any]:
    from .probe import Probe

    gid = f"bench-mem-{adapter.key}-{uid()}"
    g = guild_spec(gid)
    specs = [responder(f"idle-{i}-{uid()}") for i in range(n)]
    ids = [s.id for s in specs]
    probe = Probe(gid, adapter.messaging)
    try:
        gc.collect()
        await settle(0.5)
        before = smaps_rollup(os.getpid()) if adapter.in_process else None
        base_cpu = 0.0
        if adapter.in_process:  # the process's own idle CPU (probe threads) before the agents
            c0 = cpu_seconds(os.getpid())
            await settle(IDLE_SETTLE_S)
            base_cpu = cpu_seconds(os.getpid()) - c0
        errors = [e for e in await adapter.run_many(g, specs) if e is not None]
        if errors:
            say(f"{adapter.key} memory: {len(errors)} launches failed, first: {errors[0]!r}")
        # Idle CPU before any message: afterwards every answer fans out to every agent of
        # the guild, which is work, not idling.
        await settle(1.0)
        pids = {} if adapter.in_process else await adapter.pids(gid, ids)
        watched = [os.getpid()] if adapter.in_process else list(pids.values())
        c0 = sum(cpu_seconds(p) for p in watched)
        await settle(IDLE_SETTLE_S)
        idle_cpu = sum(cpu_seconds(p) for p in watched) - c0 - base_cpu
        probe.hello()
        answered = await asyncio.to_thread(probe.wait_answers, set(ids), 60.0, 1.0)
        await settle(IDLE_SETTLE_S)
        row: dict[str, Any] = {
            "engine": adapter.label,
            "engine_key": adapter.key,
            "scenario": "pss_per_idle_agent",
            "n": n,
            "answering": len(answered),
            "idle_cpu_pct_per_agent": max(0.0, 100.0 * idle_cpu / IDLE_SETTLE_S / n),
            "notes": list(adapter.notes),
        }
        if adapter.in_process:
            gc.collect()
            after = smaps_rollup(os.getpid())
            row["mb"] = (after["pss_mb"] - before["pss_mb"]) / n
            row["uss_mb"] = (after["uss_mb"] - before["uss_mb"]) / n
            row["process_pss_before_mb"] = before["pss_mb"]
            row["process_pss_after_mb"] = after["pss_mb"]
            row["measure"] = "PSS growth of the engine's process per agent (agents are threads)"
        else:
            readings = []
            for pid in pids.values():
                try:
                    readings.append(smaps_rollup(pid))
                except OSError:
                    pass
            pss = [r["pss_mb"] for r in readings]
            row["mb"] = percentile(pss, 50)
            row["uss_mb"] = percentile([r["uss_mb"] for r in readings], 50)
            row["rss_mb"] = percentile([r["rss_mb"] for r in readings], 50)
            row["min_mb"] = min(pss) if pss else None
            row["max_mb"] = max(pss) if pss else None
            row["processes_read"] = len(readings)
            row["measure"] = "median PSS of the agents' own processes (smaps_rollup)"
        row.update(adapter.extra_memory())
        say(f"{adapter.key} memory: {row['mb']:.1f} MB PSS per idle agent over {n} agents "
            f"({len(answered)} answering); idle CPU {row['idle_cpu_pct_per_agent']:.2f}% of a core per agent")
        if isinstance(adapter, K8sAdapter):
            await asyncio.gather(*(adapter.stop_agent(gid, a) for a in ids), return_exceptions=True)
        else:
            await _stop_each(adapter, gid, ids)
        return row
    finally:
        probe.close()


async def _stop_each(adapter: Adapter, gid: str, ids: list[str]) -> None:
    for a in ids:
        try:
            await adapter.stop_agent(gid, a)
        except Exception as exc:
            say(f"stop {a}: {exc!r}")


# -- burst -----------------------------------------------------------------------------------------


async def burst_scenario(adapter: K8sAdapter, n: int) -> dict[str, Any]:
    from .probe import Probe

    gid = f"bench-burst-{uid()}"
    g = guild_spec(gid)
    specs = [responder(f"burst-{i}-{uid()}") for i in range(n)]
    ids = {s.id for s in specs}
    probe = Probe(gid, adapter.messaging)
    try:
        requests = [adapter.engine.build_request(g, s, adapter.messaging, machine_id=i + 1)
                    for i, s in enumerate(specs)]
        t0 = time.perf_counter()
        results = await adapter.engine.launch_many(requests)
        t_launched = time.perf_counter()
        failed = [r for r in results if isinstance(r, BaseException)]
        probe.hello()
        answered = await asyncio.to_thread(probe.wait_answers, ids, 30.0, 5.0)
        per_agent = sorted(ms(a.at - t0) for a in answered.values())
        all_ms = per_agent[-1] if len(answered) == n else None
        hosts: dict[str, int] = {}
        for r in results:
            if not isinstance(r, BaseException):
                hosts[r.host] = hosts.get(r.host, 0) + 1
        say(f"burst: {n} agents, launch_many {ms(t_launched - t0):.0f} ms, "
            f"{len(answered)}/{n} answered, last at {per_agent[-1] if per_agent else float('nan'):.0f} ms; "
            f"hosts {sorted(hosts.values())}")
        row = {
            "engine": adapter.label,
            "engine_key": adapter.key,
            "scenario": f"burst_{n}",
            "n": n,
            "all_answered_ms": all_ms,
            "last_answer_ms": per_agent[-1] if per_agent else None,
            "launch_many_ms": ms(t_launched - t0),
            "p50_ms": percentile(per_agent, 50),
            "p95_ms": percentile(per_agent, 95),
            "answered": len(answered),
            "answered_first_publish": sum(1 for a in answered.values() if probe.publish_index(a.hello_id) == 1),
            "launch_failures": [repr(f)[:300] for f in failed[:5]],
            "agents_per_host": sorted(hosts.values()),
            "method": "launch_many of one guild's agents, then one hello (re-published after 5 s if need be); "
                      "time from launch_many's call to the last agent's first reply",
            "notes": list(adapter.notes),
        }
        await asyncio.gather(*(adapter.stop_agent(gid, a) for a in ids), return_exceptions=True)
        return row
    finally:
        probe.close()


# -- density ---------------------------------------------------------------------------------------


async def density_scenario(n: int) -> list[dict[str, Any]]:
    from .probe import Probe

    adapter = K8sAdapter("warm", hosts=1, capacity=n)
    adapter.notes = [f"one rustic-agent-host, capacity {n}, launch_mode=warm"]
    await adapter.start()
    try:
        gid = f"bench-density-{uid()}"
        g = guild_spec(gid)
        specs = [responder(f"dense-{i}-{uid()}") for i in range(n)]
        ids = [s.id for s in specs]
        probe = Probe(gid, adapter.messaging)
        try:
            from rustic_ai.k8s.base.errors import TemporaryError

            t0 = time.perf_counter()
            results = await adapter.run_many(g, specs)
            launch_s = time.perf_counter() - t0
            first_errors = [e for e in results if e is not None]
            first_ok = n - len(first_errors)
            # A TemporaryError says "try again": the caller's retry, once, for the ones refused.
            retry = [s for s, e in zip(specs, results, strict=True) if isinstance(e, TemporaryError)]
            errors = [e for e in first_errors if not isinstance(e, TemporaryError)]
            if retry:
                say(f"density: first launch_many: {first_ok}/{n} running; {len(retry)} TemporaryErrors "
                    f"({first_errors[0]!r}); retrying those once")
                await settle(1.0)
                errors += [e for e in await adapter.run_many(g, retry) if e is not None]
            running = await asyncio.gather(*(adapter.engine.is_agent_running(gid, a) for a in ids))
            # Idle CPU before any message: afterwards each of the 100 answers is delivered to
            # all 100 agents (10,000 deliveries), which is work, not idling.
            await settle(1.0)
            pids = await adapter.pids(gid, ids)
            c0 = sum(cpu_seconds(p) for p in pids.values())
            await settle(IDLE_SETTLE_S * 2)
            idle_cpu = (sum(cpu_seconds(p) for p in pids.values()) - c0) / 2
            probe.hello()
            answered = await asyncio.to_thread(probe.wait_answers, set(ids), 30.0, 2.0)
            await settle(IDLE_SETTLE_S)
            agent_pss = []
            for pid in pids.values():
                try:
                    agent_pss.append(pss_mb(pid))
                except OSError:
                    pass
            host_pid = next(iter(adapter.host_pids().values()))
            fs_pid = next(iter(adapter.forkserver_pids().values()), None)
            host_mb = pss_mb(host_pid)
            fs_mb = pss_mb(fs_pid) if fs_pid else 0.0
            agents_mb = sum(agent_pss)
            say(f"density: {sum(running)}/{n} running, {len(answered)}/{n} answering, launched in {launch_s:.1f} s; "
                f"host {host_mb:.0f} MB + fork server {fs_mb:.0f} MB + agents {agents_mb:.0f} MB; "
                f"idle agents use {100.0 * idle_cpu / IDLE_SETTLE_S:.0f}% of a core")
            row = {
                "engine": adapter.label,
                "engine_key": "k8s-warm",
                "scenario": f"density_{n}_one_host",
                "n": n,
                "running": int(sum(running)),
                "answering": len(answered),
                "launch_errors": [repr(e)[:300] for e in errors[:5]],
                "launch_many_s": launch_s,
                "first_pass_running": first_ok,
                "first_pass_errors": [repr(e)[:300] for e in first_errors[:5]],
                "first_pass_error_count": len(first_errors),
                "retried": len(retry),
                "mb": host_mb + fs_mb + agents_mb,
                "agents_total_mb": agents_mb,
                "agent_median_mb": percentile(agent_pss, 50),
                "host_process_mb": host_mb,
                "idle_cpu_pct": 100.0 * idle_cpu / IDLE_SETTLE_S,
                "fork_server_mb": fs_mb,
                "measure": "PSS: host process + its fork server + every agent process",
                "notes": list(adapter.notes),
            }
            await asyncio.gather(*(adapter.stop_agent(gid, a) for a in ids), return_exceptions=True)
            return [row]
        finally:
            probe.close()
    finally:
        await adapter.close()


# -- registry --------------------------------------------------------------------------------------


def _registry(url: str, prefix: str):
    """A LocationRegistry whose host lease outlives the benchmark, whatever the kwarg is called."""
    from rustic_ai.k8s.registry import LocationRegistry

    params = inspect.signature(LocationRegistry).parameters
    kw: dict[str, float] = {}
    for name in ("lease_s", "host_ttl_s"):
        if name in params:
            kw[name] = 3600.0
    if "agent_ttl_s" in params:
        kw["agent_ttl_s"] = 3600.0
    return LocationRegistry(url, prefix, **kw)


async def registry_scenario(n_agents: int, guild_size: int, calls: int, guild_calls: int) -> list[dict[str, Any]]:
    from rustic_ai.k8s import AsyncK8sEngine, EngineSettings
    from rustic_ai.k8s.base.models import AgentRecord, AgentState, HostRecord, HostState

    from .common import PrivateRedis

    with PrivateRedis() as redis:
        prefix = f"bench-{uid()}"
        address = "bench-host.invalid:50051"  # never dialled: reads only
        registry = _registry(redis.url, prefix)
        await registry.start()
        engine = AsyncK8sEngine(EngineSettings.from_env({}, redis_url=redis.url, key_prefix=prefix),
                                organization_id="bench-org")
        await engine.start()
        try:
            await registry.heartbeat(HostRecord(address, "bench-host", capacity=n_agents, state=HostState.SERVING), [])
            n_guilds = max(1, n_agents // guild_size)
            keys: list[tuple[str, str]] = []
            t0 = time.perf_counter()
            sem = asyncio.Semaphore(64)

            async def claim(gid: str, aid: str) -> None:
                spec = responder(aid).model_dump_json()
                rec = AgentRecord(guild_id=gid, agent_id=aid, name=f"Responder {aid}",
                                  class_name="rustic_ai.testing.execution.integration_agents.ResponderProbeAgent",
                                  spec_json=spec, host=address, pid=1, state=AgentState.RUNNING,
                                  started_at=time.time())
                async with sem:
                    res = await registry.claim_agent(rec)
                if not res.ok:
                    raise RuntimeError(f"claim of {gid}/{aid} refused: {res}")

            jobs = []
            for gi in range(n_guilds):
                gid = f"bench-guild-{gi}"
                for ai in range(guild_size):
                    aid = f"agent-{ai}"
                    keys.append((gid, aid))
                    jobs.append(claim(gid, aid))
            for start in range(0, len(jobs), 1000):
                await asyncio.gather(*jobs[start:start + 1000])
            setup_s = time.perf_counter() - t0
            await registry.heartbeat(HostRecord(address, "bench-host", capacity=n_agents, state=HostState.SERVING), [])
            say(f"registry: {len(keys)} agents in {n_guilds} guilds registered in {setup_s:.1f} s")

            del jobs
            gc.collect()

            rng = random.Random(7)
            for gid, aid in rng.sample(keys, 200):  # warm-up: connection, script cache
                await engine.is_agent_running(gid, aid)
            lat, ping = [], []
            hits = 0
            for gid, aid in (rng.choice(keys) for _ in range(calls)):
                t = time.perf_counter_ns()
                ok = await engine.is_agent_running(gid, aid)
                lat.append((time.perf_counter_ns() - t) / 1e6)
                hits += ok
                # Interleaved: the floor (one Redis round trip) under the same machine noise.
                t = time.perf_counter_ns()
                await registry.redis.ping()
                ping.append((time.perf_counter_ns() - t) / 1e6)
            st, pst = summary(lat), summary(ping)
            say(f"registry: is_agent_running p50 {st['p50']:.3f} ms p99 {st['p99']:.3f} ms ({hits}/{calls} true); "
                f"Redis PING p50 {pst['p50']:.3f} ms p99 {pst['p99']:.3f} ms")

            gid = "bench-guild-0"
            for _ in range(20):
                await engine.get_agents_in_guild(gid)
            await registry.redis.config_resetstat()
            glat, raw_lat = [], []
            sizes = set()
            for _ in range(guild_calls):
                t = time.perf_counter_ns()
                agents = await engine.get_agents_in_guild(gid)
                glat.append((time.perf_counter_ns() - t) / 1e6)
                sizes.add(len(agents))
            # The same read without turning each entry's JSON back into an AgentSpec, for the breakdown.
            for _ in range(max(1, guild_calls // 2)):
                t = time.perf_counter_ns()
                await engine.list_agents(gid)
                raw_lat.append((time.perf_counter_ns() - t) / 1e6)
            gst, rst = summary(glat), summary(raw_lat)
            stats = await registry.redis.info("commandstats")
            script_ms = stats.get("cmdstat_evalsha", {}).get("usec_per_call", 0.0) / 1000.0
            say(f"registry: get_agents_in_guild({guild_size}) p50 {gst['p50']:.2f} ms p99 {gst['p99']:.2f} ms "
                f"(list_agents without spec parsing p50 {rst['p50']:.2f} ms)")
            label = "rusticai-k8s (registry)"
            return [
                {
                    "engine": label, "engine_key": "k8s-registry", "scenario": f"is_agent_running_{len(keys)}",
                    "p50_ms": st["p50"], "p95_ms": st["p95"], "p99_ms": st["p99"], "max_ms": st["max"],
                    "n": calls, "true_answers": hits, "registered_agents": len(keys), "setup_s": setup_s,
                    "redis_ping_p50_ms": pst["p50"], "redis_ping_p99_ms": pst["p99"],
                    "method": "AsyncK8sEngine.is_agent_running on random registered agents, one call at a time",
                },
                {
                    "engine": label, "engine_key": "k8s-registry", "scenario": f"get_agents_in_guild_{guild_size}",
                    "p50_ms": gst["p50"], "p95_ms": gst["p95"], "p99_ms": gst["p99"], "max_ms": gst["max"],
                    "n": guild_calls, "guild_sizes_seen": sorted(sizes), "registered_agents": len(keys),
                    "list_agents_p50_ms": rst["p50"], "list_agents_p99_ms": rst["p99"],
                    "redis_script_ms_per_call": script_ms,
                    "method": "AsyncK8sEngine.get_agents_in_guild of one guild, one call at a time",
                },
            ]
        finally:
            await engine.shutdown()
            await registry.close()


# -- entry -----------------------------------------------------------------------------------------


async def run(config: dict[str, Any]) -> list[dict[str, Any]]:
    task = config["task"]
    if task == "registry":
        return await registry_scenario(config["agents"], config["guild_size"], config["calls"], config["guild_calls"])
    if task == "density":
        return await density_scenario(config["agents"])
    if task != "engine":
        raise ValueError(f"unknown task {task!r}")
    adapter = make_adapter(config["engine"])
    rows: list[dict[str, Any]] = []
    t = time.perf_counter()
    await adapter.start()
    say(f"{adapter.label}: ready in {time.perf_counter() - t:.1f} s (not timed)")
    try:
        scenarios = config["scenarios"]
        if "launch" in scenarios:
            rows.append(await launch_scenario(adapter, config["n"], config["warmup"]))
        if "memory" in scenarios:
            rows.append(await memory_scenario(adapter, config["memory_agents"]))
        if "burst" in scenarios and isinstance(adapter, K8sAdapter):
            rows.append(await burst_scenario(adapter, config["burst_agents"]))
    finally:
        await adapter.close()
    return rows


def main() -> int:
    warnings.simplefilter("ignore")  # fork-with-threads and library deprecation warnings
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    config = json.loads(sys.argv[1])
    out_path = sys.argv[2]
    try:
        rows = asyncio.run(run(config))
        code = 0
    except BaseException as exc:  # reported to the orchestrator as a row, not lost
        traceback.print_exc()
        rows = [{"error": f"{type(exc).__name__}: {exc}", "task": config}]
        code = 1
    with open(out_path, "w") as f:
        json.dump(rows, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: agent threads of in-process engines must not hold the exit


if __name__ == "__main__":
    main()
