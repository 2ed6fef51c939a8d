"""Launch -> first reply through what users call: ``Guild.launch_agent`` of an unchanged rusticai-core Guild.

The launch scenario times each engine's own ``run_agent``; users go through the Guild,
which builds its engine from a class path (``K8sExecutionEngine`` from the environment),
asks ``is_agent_running`` first and builds the guild's spec on every launch. This scenario
times that path for every engine in one run, *interleaved*: one worker process per engine
(so nothing one engine leaves behind changes another's numbers), all started first, then
the orchestrator asks them in turn for one launch each, rotating who goes first each
round, so a busy moment on the shared machine falls on every engine alike.

Each launch: a fresh ``Guild(...)`` (built before the clock starts, as a user builds a
guild once), a probe joined to it, then the clock: ``guild.launch_agent(spec)``, one
hello right after it returns (re-published every 20 ms), stopped at the first reply.
Then ``guild.remove_agent`` and ``guild.shutdown()``, untimed.

Worker: ``python -m benchmarks.guild_launch ENGINE`` reads ``launch I`` / ``close`` lines on
stdin and answers one JSON line each on stdout; progress and errors go to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
import traceback
import uuid
import warnings
from pathlib import Path
from typing import Any

from .common import PrivateRedis, ms, percentile, redis_messaging, responder, summary

ORG = "bench-org"
LAUNCH_TIMEOUT_S = 60.0
ROOT = Path(__file__).resolve().parent.parent

ENGINE_CLASSES = {
    "sync": "rustic_ai.core.guild.execution.sync.sync_exec_engine.SyncExecutionEngine",
    "multithreaded": "rustic_ai.core.guild.execution.multithreaded.multithreaded_exec_engine.MultiThreadedEngine",
    "multiprocess": "rustic_ai.core.guild.execution.multiprocess.MultiProcessExecutionEngine",
    "k8s-warm": "rustic_ai.k8s.K8sExecutionEngine",
    "ray": "rustic_ai.ray.execution.RayExecutionEngine",
}
LABELS = {
    "sync": "SyncExecutionEngine",
    "multithreaded": "MultiThreadedEngine",
    "multiprocess": "MultiProcessExecutionEngine",
    "k8s-warm": "K8sExecutionEngine (warm)",
    "ray": "RayExecutionEngine",
}
DEFAULT_ENGINES = ("sync", "multithreaded", "multiprocess", "k8s-warm", "ray")


# -- worker ----------------------------------------------------------------------------------------


class _Backend:
    """What one engine's guilds run against: a private Redis, plus hosts (K8s) or Ray."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.notes: list[str] = []
        self._stop: list[Any] = []

    def start(self) -> None:
        if self.key == "k8s-warm":
            self._start_cluster()
        else:
            redis = PrivateRedis().start()
            self._stop.append(redis.close)
            self.port = redis.port
        if self.key == "ray":
            from .engines import start_local_ray

            self.notes += start_local_ray()
            import ray

            self._stop.append(ray.shutdown)
        self.messaging = redis_messaging(self.port)

    def _start_cluster(self) -> None:
        # The cluster's own loop is a thread of its own: K8sExecutionEngine's background
        # loop then serves the engine alone, as it does in a user's process.
        from rustic_ai.k8s.cli.local_cluster import LocalCluster

        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="bench-cluster", daemon=True).start()
        cluster = LocalCluster(2, launch_mode="warm")
        asyncio.run_coroutine_threadsafe(cluster.start(), loop).result(120)
        self._stop.append(lambda: asyncio.run_coroutine_threadsafe(cluster.close(), loop).result(60))
        os.environ.update(cluster.env)  # the Guild builds K8sExecutionEngine from the environment
        self.port = cluster.redis_port
        self.notes.append("K8sExecutionEngine built by the Guild from RUSTIC_K8S_REDIS_URL/KEY_PREFIX; "
                          "a LocalCluster of 2 rustic-agent-host processes, launch_mode=warm")

    def close(self) -> None:
        for stop in reversed(self._stop):
            with contextlib.suppress(Exception):
                stop()


def _launch_once(backend: _Backend, i: int) -> dict[str, Any]:
    from rustic_ai.core.guild.guild import Guild

    from .probe import Probe

    gid = f"bench-guild-{backend.key}-{i}-{uuid.uuid4().hex[:8]}"
    spec = responder(f"responder-{i}-{uuid.uuid4().hex[:8]}")
    t = time.perf_counter()
    guild = Guild(id=gid, name="Bench Guild", description="benchmark guild", organization_id=ORG,
                  execution_engine_clz=ENGINE_CLASSES[backend.key], messaging_config=backend.messaging)
    guild_ms = ms(time.perf_counter() - t)
    probe = Probe(gid, backend.messaging)
    try:
        t0 = time.perf_counter()
        guild.launch_agent(spec)
        returned = time.perf_counter()
        probe.hello()
        ack = probe.wait_answers({spec.id}, LAUNCH_TIMEOUT_S).get(spec.id)
        if ack is None:
            return {"error": f"{spec.id}: no reply within {LAUNCH_TIMEOUT_S:.0f} s"}
        return {"total_ms": ms(ack.at - t0), "launch_agent_ms": ms(returned - t0), "guild_ms": guild_ms,
                "answered_publish": probe.publish_index(ack.hello_id)}
    finally:
        with contextlib.suppress(Exception):
            guild.remove_agent(spec.id)
        # rusticai-ray 1.4's RayExecutionEngine.shutdown() calls ray.shutdown(): the next
        # Guild would find no Ray. Its agent is removed above; the runtime stays for the run.
        if backend.key != "ray":
            guild.shutdown()
        probe.close()


def serve(key: str) -> int:
    """The worker: one engine, one launch per ``launch`` line, until ``close``."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything else printed must not corrupt the protocol
    backend = _Backend(key)
    try:
        t = time.perf_counter()
        backend.start()
        out.write(json.dumps({"ready": True, "start_s": time.perf_counter() - t, "notes": backend.notes}) + "\n")
        out.flush()
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "close":
                break
            try:
                reply = _launch_once(backend, int(cmd[1]))
            except Exception as exc:
                traceback.print_exc()
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()
    except BaseException as exc:
        traceback.print_exc()
        out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        out.flush()
        return 1
    finally:
        backend.close()
    return 0


# -- orchestrator ----------------------------------------------------------------------------------


class _Worker:
    def __init__(self, key: str, log_dir: Path) -> None:
        self.key = key
        self.log = open(log_dir / f"guild-{key}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.guild_launch", key], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1, start_new_session=True)

    def read(self, timeout_s: float) -> dict[str, Any]:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            return {"error": f"no answer within {timeout_s:.0f} s" if not ready else "worker exited"}
        return json.loads(line)

    def ask(self, cmd: str, timeout_s: float) -> dict[str, Any]:
        try:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"error": "worker exited"}
        return self.read(timeout_s)

    def stop(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.write("close\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.log.close()


def run_scenario(engines: list[str], n: int, warmup: int, log_dir: Path) -> list[dict[str, Any]]:
    """All engines' workers at once, launches interleaved; one result row per engine."""
    print(f"\n== guild: Guild.launch_agent -> first reply, interleaved over {', '.join(engines)}", flush=True)
    began = time.monotonic()
    workers: dict[str, _Worker] = {}
    rows: list[dict[str, Any]] = []
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in engines}
    warmups: dict[str, list[float]] = {k: [] for k in engines}
    failures: dict[str, list[str]] = {k: [] for k in engines}
    notes: dict[str, list[str]] = {}
    try:
        for key in engines:  # one at a time: start-up (Ray, hosts) is not measured but is busy
            workers[key] = _Worker(key, log_dir)
            hello = workers[key].read(240)
            if "error" in hello:
                print(f"   guild {key}: FAILED to start: {hello['error']} (log: {workers[key].log.name})", flush=True)
                rows.append({"error": f"guild scenario, {key}: {hello['error']}", "engine_key": key})
                workers.pop(key).stop()
                continue
            notes[key] = hello.get("notes", [])
        live = list(workers)
        for i in range(warmup + n):
            order = live[i % len(live):] + live[:i % len(live)] if live else []
            for key in order:
                got = workers[key].ask(f"launch {i}", LAUNCH_TIMEOUT_S + 30)
                if "error" in got:
                    failures[key].append(got["error"])
                    print(f"   guild {key} launch {i}: FAILED {got['error']}", flush=True)
                elif i < warmup:
                    warmups[key].append(round(got["total_ms"], 3))
                else:
                    samples[key].append(got)
            done = {k: samples[k][-1]["total_ms"] for k in order if samples[k] and i >= warmup}
            tag = "warm-up" if i < warmup else f"{i - warmup + 1}/{n}"
            print(f"   guild round {tag}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in done.items()), flush=True)
    finally:
        for w in workers.values():
            w.stop()
    for key in engines:
        if key not in notes:
            continue
        got = samples[key]
        st = summary([s["total_ms"] for s in got])
        rows.append({
            "engine": LABELS[key], "engine_key": key, "scenario": "guild_launch_to_first_reply",
            "p50_ms": st.get("p50"), "p95_ms": st.get("p95"), "p99_ms": st.get("p99"),
            "min_ms": st.get("min"), "max_ms": st.get("max"), "n": len(got), "warmup": warmup,
            "launch_agent_p50_ms": percentile([s["launch_agent_ms"] for s in got], 50),
            "guild_construct_p50_ms": percentile([s["guild_ms"] for s in got], 50),
            "answered_first_publish": sum(1 for s in got if s["answered_publish"] == 1),
            "samples_ms": [round(s["total_ms"], 3) for s in got],
            "launch_agent_samples_ms": [round(s["launch_agent_ms"], 3) for s in got],
            "warmup_samples_ms": warmups[key],
            "failures": failures[key],
            "method": "Guild(...) built before the clock; guild.launch_agent(spec), then one hello re-published "
                      "every 20 ms until the first reply; a fresh guild per launch; engines interleaved, one "
                      "launch each per round, in one worker process per engine",
            "notes": notes[key],
        })
    print(f"   ({time.monotonic() - began:.0f} s)", flush=True)
    return rows


# -- where the time goes (``python -m benchmarks.profile guild``) -------------------------------------

# (label, class path, method) timed in the caller's process; the host's and the agent's share is
# what create_agent takes (the host's own steps: benchmarks.profile steps and pyspy).
_TIMED = [
    ("Guild.launch_agent (all of it)", "rustic_ai.core.guild.guild.Guild", "launch_agent"),
    ("  facade is_agent_running (with thread hops)", "rustic_ai.k8s.engine.sync_engine.K8sExecutionEngine",
     "is_agent_running"),
    ("    on the engine loop", "rustic_ai.k8s.engine.engine.AsyncK8sEngine", "is_agent_running"),
    ("  Guild.to_spec", "rustic_ai.core.guild.guild.Guild", "to_spec"),
    ("  facade run_agent (with thread hops)", "rustic_ai.k8s.engine.sync_engine.K8sExecutionEngine", "run_agent"),
    ("    build_request (specs to JSON)", "rustic_ai.k8s.engine.engine.AsyncK8sEngine", "build_request"),
    ("    launch, on the engine loop", "rustic_ai.k8s.engine.engine.AsyncK8sEngine", "launch"),
    ("      registry set_desired", "rustic_ai.k8s.registry.registry.LocationRegistry", "set_desired"),
    ("      Health probe (hosts not heard from lately)", "rustic_ai.k8s.engine.engine.AsyncK8sEngine", "_probe"),
    ("      create_agent: host, fork, agent build", "rustic_ai.k8s.protocol.client.HostClient", "create_agent"),
]


def _timer(samples: list[float], fn: Any) -> Any:
    import functools
    import inspect

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def timed_async(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return await fn(*a, **kw)
            finally:
                samples.append(ms(time.perf_counter() - t))
        return timed_async

    @functools.wraps(fn)
    def timed(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            samples.append(ms(time.perf_counter() - t))
    return timed


def profile(n: int, warmup: int = 2) -> int:
    """Medians of each step of Guild.launch_agent -> first reply for K8sExecutionEngine, in one process."""
    import importlib

    samples: dict[str, list[float]] = {label: [] for label, _, _ in _TIMED}
    for label, path, method in _TIMED:
        module, _, cls_name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), cls_name)
        setattr(cls, method, _timer(samples[label], getattr(cls, method)))
    backend = _Backend("k8s-warm")
    backend.start()
    totals: list[float] = []
    try:
        for i in range(warmup + n):
            if i == warmup:
                for values in samples.values():
                    values.clear()
            got = _launch_once(backend, i)
            if "error" in got:
                print(f"launch {i}: {got['error']}")
            elif i >= warmup:
                totals.append(got["total_ms"])
    finally:
        backend.close()
    print(f"K8sExecutionEngine through an unchanged Guild: {len(totals)} launches after {warmup} warm-ups, "
          f"a fresh guild each; median ms")
    print(f"  {'launch -> first reply':52s} {percentile(totals, 50):7.2f}")
    for label, _, _ in _TIMED:
        values = samples[label]
        per_launch = len(values) / max(1, len(totals))
        print(f"  {label:52s} {percentile(values, 50) if values else 0.0:7.2f}"
              + (f"   ({per_launch:.1f} calls per launch)" if values and per_launch != 1 else ""))
    return 0


def main() -> int:
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    code = serve(sys.argv[1])
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: agent threads of in-process engines must not hold the exit


if __name__ == "__main__":
    main()
